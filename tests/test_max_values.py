"""``x.max(dim).values`` / ``x.min(dim).values`` lowered as reductions (``amax``/``amin``), not
as TVM's sort-based ``topk``: Hiera-Tiny's pooled queries spent 23 ms of its 70 in six
``topk`` kernels (session 27). Where the indices are read, ``max.dim`` stays."""

from __future__ import annotations

import json

import numpy as np
import torch
from slimc.backends.tvm.legalize import legalize

import slimc
from slimc.ir import IR

aten = torch.ops.aten


class PooledQueries(torch.nn.Module):
    """Hiera's query pooling (a max over the stride axis of a view), a min kept as values, and
    an argmax-style use whose indices must survive."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = x.view(1, 4, -1, 32).max(dim=1).values  # (1, 49, 32)
        low = x.min(dim=-1, keepdim=True).values
        best = x.max(dim=-1)  # values and indices both read
        return pooled + low.mean(), best.values + best.indices.float()


def pooled_queries():
    torch.manual_seed(0)
    return PooledQueries().eval(), (torch.randn(1, 196, 32),)


def test_values_only_max_and_min_become_reductions_with_the_same_values(tmp_path):
    model, args = pooled_queries()
    ir = IR(torch.export.export(model, args))
    fired = legalize(ir)
    assert fired["max_min_dim_values_as_amax"] == 2, fired
    targets = [n.target for n in ir.nodes("call_function")]
    assert targets.count(aten.max.dim) == 1 and aten.min.dim not in targets
    assert aten.amax.default in targets and aten.amin.default in targets
    for got, want in zip(ir.run(list(args)), model(*args), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    result = slimc.compile_model("tests.test_max_values:pooled_queries", slimc.CompileOptions(
        output=tmp_path / "out", threads=2))
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["verification"]["passed"], manifest["verification"]
    compiled = slimc.load(result.output)
    (name,) = compiled.example_inputs()
    outputs = list(compiled(**{name: args[0].numpy()}).values())
    for got, want in zip(outputs, model(*args), strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)
