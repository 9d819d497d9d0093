"""GPTQ with act-order and static groups (issue 17).

Act-order chooses the codes of the loudest inputs first; with groups every grid is fixed up
front from the original weights, so the stored layout (contiguous groups, same scales' shapes
and bytes) is that of plain GPTQ and the kernels do not change. Checked on a layer whose inputs
have very different energies (as real LLM activations do), and through the real ``quantize``
pass on a tiny HF Llama.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from slimc.passes.quantize.formats import parse_format
from slimc.passes.quantize.gptq import _set_group, gptq
from slimc.passes.quantize.quantize import QuantizeOptions, quantize_ir

from slimc.capture import capture
from slimc.loaders.base import LoadedModel
from slimc.lowbit import dequantize_lowbit, pack_bits
from slimc.passmanager import PassContext


def _layer():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=gen)
    mix = torch.eye(256) + 0.2 * torch.randn(256, 256, generator=gen)
    loud = torch.logspace(-1, 1, 256)[torch.randperm(256, generator=gen)]
    x = torch.randn(4096, 256, generator=gen) @ mix * loud
    return w, x, 2 / x.shape[0] * x.t() @ x


def _dequantized(codes, grid, fmt, k):
    if fmt.lowbit:
        scale, minimum = grid
        return dequantize_lowbit(pack_bits(codes, 3), scale, minimum, 3, fmt.group_size, k)
    index = torch.arange(k) // fmt.group_size
    return codes.float() * grid.scale.float()[:, index] + grid.zero.float()[:, index]


@pytest.mark.parametrize("spec", ["int4-g64-fz", "int3-g64"])
def test_act_order_lowers_the_output_error_with_static_contiguous_groups(spec):
    fmt = parse_format(spec)
    w, x, h = _layer()
    errors = {}
    for act_order in (False, True):
        codes, grid = gptq(w, h, fmt, act_order=act_order)
        q = _dequantized(codes, grid, fmt, w.shape[1])
        errors[act_order] = float((x @ (w - q).t()).pow(2).sum() / (x @ w.t()).pow(2).sum())
        if act_order:  # static groups: each group's grid is the one of its own original span
            scales = torch.zeros_like(grid[0] if fmt.lowbit else grid.scale)
            zeros = torch.zeros_like(grid[1] if fmt.lowbit else grid.zero)
            for g in range(w.shape[1] // fmt.group_size):
                _set_group(fmt, w[:, g * 64:(g + 1) * 64].double(), scales, zeros, g)
            assert torch.equal(scales, grid[0] if fmt.lowbit else grid.scale)
            assert torch.equal(zeros, grid[1] if fmt.lowbit else grid.zero)
    assert errors[True] < 0.9 * errors[False], errors


def test_act_order_is_identity_free_for_plain_options():
    """``act_order=False`` (the default) is plain GPTQ: the first column's code is chosen
    first; with act-order the same Hessian gives other codes on this layer."""
    fmt = parse_format("int4-g64-fz")
    w, _, h = _layer()
    plain, _ = gptq(w, h, fmt)
    again, _ = gptq(w, h, fmt, act_order=False)
    ordered, _ = gptq(w, h, fmt, act_order=True)
    assert torch.equal(plain, again)
    assert not torch.equal(plain, ordered)


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def test_quantize_pass_runs_gptq_with_act_order_on_a_tiny_llama():
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                           max_position_embeddings=64)
    module = _Logits(T.LlamaForCausalLM(config).eval()).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 32), generator=gen) for _ in range(4)]
    with torch.no_grad():
        reference = module(batches[0])
    sizes, errors = {}, {}
    for act_order in (False, True):
        ir, inputs = capture(LoadedModel(name="tiny", module=module,
                                         example_inputs={"input_ids": batches[0]},
                                         as_kwargs=True))
        ctx = PassContext(example_inputs=inputs)
        ctx.calibration_batches = [[b] for b in batches]
        summary = quantize_ir(ir, ctx, QuantizeOptions(
            weights="int4", group_size=32, zero_point="float", method="gptq",
            embeddings=False, act_order=act_order))
        assert all(v["method"] == "gptq" for v in summary["per_layer"].values())
        sizes[act_order] = summary["bytes_after"]
        out = ir.run([batches[0]])[0]
        errors[act_order] = float((out - reference).pow(2).mean() / reference.pow(2).mean())
    assert sizes[True] == sizes[False]  # same layout, same bytes
    assert errors[True] < 0.05 and errors[False] < 0.05, errors
