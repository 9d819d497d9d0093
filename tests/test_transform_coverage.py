"""Every compressing transform says how much of the weight bytes it reached and, for the rest,
why not: in its summary (``manifest.json``) and on the console, never silently (issue 19).

One small model carries what the transforms cannot touch: a transposed convolution (no
quantized kernel, not factorized), a 2-D parameter read by an elementwise ``mul`` (not a weight
op), bias vectors, next to a convolution and two linears they can. Each of ``quantize``,
``lowrank`` and ``prune`` runs through the pass manager with a console that records its lines.
"""

from __future__ import annotations

import pytest
import torch

from slimc.capture import capture, load_model
from slimc.passmanager import PassContext, PassManager
from slimc.pipeline import parse_pipeline_text, validate
from slimc.plugins import get_registry

torch.set_num_threads(2)
REGISTRY = get_registry()


class Mixed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.gate = torch.nn.Parameter(torch.randn(16, 16))
        self.fc1 = torch.nn.Linear(8 * 16 * 16, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(torch.relu(self.conv(x))) * self.gate
        return self.fc2(torch.relu(self.fc1(y.flatten(1))))


def mixed():
    return Mixed().eval(), (torch.randn(2, 3, 8, 8),)


def _run(pipeline: str):
    ir, inputs = capture(load_model("tests.test_transform_coverage:mixed"))
    lines: list[str] = []
    ctx = PassContext(example_inputs=inputs, log=lines.append)
    PassManager(REGISTRY.passes).run(ir, validate(parse_pipeline_text(pipeline),
                                                  REGISTRY.passes), ctx)
    return ir, lines


def _reasons(cov: dict) -> dict[str, int]:
    return {g["reason"]: g["bytes"] for g in cov["untouched"]}


@pytest.mark.parametrize(("pipeline", "verb"), [
    ("quantize{weights=int8}", "quantized"),
    ("lowrank{ratio=0.5,round_to=4}", "factorized"),
    ("prune{ratio=0.5,round_to=4}", "pruned")])
def test_every_transform_reports_what_it_left_and_why(pipeline, verb):
    name = pipeline.split("{")[0]
    ir, lines = _run(pipeline)
    cov = ir.annotations[name]["coverage"]
    model = Mixed()
    up_bytes = model.up.weight.numel() * 4
    gate_bytes = model.gate.numel() * 4
    assert cov["weight_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    assert 0 < cov["reached_bytes"] < cov["weight_bytes"]
    assert cov["reached_bytes"] + sum(_reasons(cov).values()) == cov["weight_bytes"]
    reasons = _reasons(cov)
    # the elementwise-read parameter and (for quantize / lowrank) the transposed conv: named
    assert any("mul" in r and b >= gate_bytes for r, b in reasons.items()), reasons
    if name != "prune":
        assert any("transposed convolution" in r and b >= up_bytes
                   for r, b in reasons.items()), reasons
    assert all(r and r != "not reached" for r in reasons), reasons
    console = [ln for ln in lines if ln.startswith(f"{name}:")]
    assert console and f"{verb} " in console[-1] and "untouched:" in console[-1], lines
