"""Weights TVM can import without copying them.

TVM's PyTorch importer wraps each weight with DLPack, zero-copy, but only when its data is
64-byte aligned (``kAllocAlignment``); otherwise it silently falls back to a numpy copy.
Weights that ``transformers`` loads from safetensors are views into the memory-mapped file at
8-byte offsets, so *every* weight of a Hugging Face model was copied while lowering: one more
full copy of the model in the compiling process (0.54 GB for SmolLM2-135M), kept alive by the
Relax module for the whole build while the mapped originals stayed resident too.

:func:`align_weights` replaces such weights in the IR, one at a time, with aligned contiguous
copies of the same values (views of one storage, such as tied embeddings, stay shared), so the
mapped originals can be released and TVM shares the IR's memory instead of copying it.
"""

from __future__ import annotations

import torch
from torch.export.graph_signature import InputKind

from slimc.ir import IR

#: TVM's runtime alignment for tensor data (``tvm::runtime::kAllocAlignment``).
ALIGNMENT = 64


def aligned(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and tensor.data_ptr() % ALIGNMENT == 0


def aligned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``tensor`` whose data starts on a 64-byte boundary."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype)
    if out.data_ptr() % ALIGNMENT:  # torch's allocator aligns to 64 on common builds; be sure
        pad = ALIGNMENT // max(tensor.element_size(), 1)
        flat = torch.empty(tensor.numel() + pad, dtype=tensor.dtype)
        skip = (-flat.data_ptr() % ALIGNMENT) // max(tensor.element_size(), 1)
        out = flat[skip:skip + tensor.numel()].view(tensor.shape)
    out.copy_(tensor.detach())
    return out


def align_weights(ir: IR) -> int:
    """Make every weight of ``ir`` 64-byte aligned and contiguous; returns how many moved."""
    program = ir.program
    moved: dict[tuple, torch.Tensor] = {}
    count = 0
    for spec in program.graph_signature.input_specs:
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            continue
        in_constants = spec.kind == InputKind.CONSTANT_TENSOR or (
            spec.kind == InputKind.BUFFER and spec.persistent is False)
        table = program.constants if in_constants else program.state_dict
        value = table.get(spec.target)
        if not isinstance(value, torch.Tensor) or value.device.type != "cpu" or aligned(value):
            continue
        if value.layout != torch.strided:
            continue
        key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)
        copy = moved.get(key)
        if copy is None:
            copy = moved[key] = aligned_copy(value)
            count += 1
        table[spec.target] = (torch.nn.Parameter(copy, requires_grad=False)
                              if isinstance(value, torch.nn.Parameter) else copy)
        del value
    return count
