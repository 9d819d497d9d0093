"""Round-to-nearest: the packed tensors of a weight matrix in a format, no data needed.

Also the common last step of the data-aware methods: GPTQ hands over its own codes and grid,
AWQ a rescaled matrix; both end up as the same ``{"weight", "scale", "zero"}`` tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimc.coded_scales import CodedGrid
from slimc.lowbit import bits_of, pack_bits, pack_lowbit

from .formats import (
    Format,
    Int4Params,
    coded_codes,
    coded_grid,
    int4_codes,
    int4_params,
    pack_int4,
    quantize_int8,
)


def pack(weight: Tensor, fmt: Format, params: Int4Params | CodedGrid | None = None,
         codes: Tensor | None = None) -> dict[str, Tensor]:
    """Tensors the IR (and the artifact) stores for ``weight [N, K]`` in ``fmt``.

    ``params``/``codes`` let a caller that already chose the int4 grid and codes (GPTQ) pass
    them through; otherwise they are round-to-nearest.
    """
    if fmt.coded_scales:  # GPTQ passes its CodedGrid as params
        coded = params if isinstance(params, CodedGrid) else coded_grid(weight, fmt)
        codes = codes if codes is not None else coded_codes(weight, fmt, coded)
        packed = pack_int4(codes) if fmt.kind == "int4" else pack_bits(codes, fmt.code_bits)
        return {"weight": packed, **coded.tensors()}
    if fmt.kind == "fp16":
        return {"weight": weight.to(torch.float16)}
    if fmt.kind == "bf16":
        return {"weight": weight.to(torch.bfloat16)}
    if fmt.kind == "int8":
        codes8, scale = quantize_int8(weight)
        return {"weight": codes8, "scale": scale}
    if fmt.kind == "int4":
        params = params or int4_params(weight, fmt.group_size, fmt.symmetric, fmt.float_zero)
        codes = codes if codes is not None else int4_codes(weight, params)
        return {"weight": pack_int4(codes), "scale": params.scale, "zero": params.zero}
    if fmt.lowbit:  # GPTQ passes (codes, (scale, minimum)) as codes / params
        scale, minimum = params if params is not None else (None, None)
        return pack_lowbit(weight, bits_of(fmt.kind), fmt.group_size, scale, minimum, codes)
    raise ValueError(f"cannot pack format {fmt}")
