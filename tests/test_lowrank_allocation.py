"""``lowrank{allocation=sensitivity}``: ranks follow each layer's measured effect on the
model's outputs, not only its own spectrum (issue 13, round 2)."""

from __future__ import annotations

import torch
from slimc.passes.lowrank import allocate

from slimc.capture import capture, load_model
from slimc.passmanager import PassContext, PassManager, relative_l2
from slimc.pipeline import parse_pipeline_text, validate
from slimc.plugins import get_registry

torch.set_num_threads(2)
REGISTRY = get_registry()
WIDTH = 128


class Unequal(torch.nn.Module):
    """Two layers of one shape on one input whose outputs the model scales 10x and 0.1x:
    per unit of its own output error, ``loud`` costs the model 10⁴ times what ``quiet`` does,
    which no spectrum of either weight can see."""

    def __init__(self) -> None:
        super().__init__()
        self.loud = torch.nn.Linear(WIDTH, WIDTH)
        self.quiet = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([10 * self.loud(x), 0.1 * self.quiet(x)], dim=-1)


def unequal():
    torch.manual_seed(0)
    return Unequal().eval(), (torch.randn(8, WIDTH),)


def _batches(seeds) -> list[list[torch.Tensor]]:
    decay = 0.97 ** torch.arange(float(WIDTH))
    return [[torch.randn(32, WIDTH, generator=torch.Generator().manual_seed(s)) * decay]
            for s in seeds]


def test_role_and_block_groups_adjacent_blocks_of_one_role():
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(6)] + ["lm_head"]
    assert allocate.role_and_block("model.layers.12.self_attn.q_proj") == \
        ("model.layers.*.self_attn.q_proj", 12)
    got = allocate.groups(names, bands=3)
    assert sorted(got.values()) == [["lm_head"]] + [
        [f"model.layers.{i}.mlp.down_proj", f"model.layers.{i + 1}.mlp.down_proj"]
        for i in (0, 2, 4)]


def test_sensitivity_gives_rank_to_the_layer_the_output_depends_on():
    held_out = _batches([99])[0]
    results = {}
    for allocation in ("uniform", "sensitivity"):
        ir, inputs = capture(load_model("tests.test_lowrank_allocation:unequal"))
        reference = ir.run(held_out)
        ctx = PassContext(example_inputs=inputs, calibration_batches=_batches(range(4)))
        pipeline = f"lowrank{{method=whiten,ratio=0.3,round_to=4,allocation={allocation}}}"
        PassManager(REGISTRY.passes).run(ir, validate(parse_pipeline_text(pipeline),
                                                      REGISTRY.passes), ctx)
        summary = ir.annotations["lowrank"]
        ranks = {k: v["rank"] for k, v in summary["per_layer"].items()}
        removed = 1 - summary["params_after"] / summary["params_before"]
        results[allocation] = (ranks, removed, relative_l2(reference, ir.run(held_out)))
    ranks, removed, error = results["sensitivity"]
    # the quiet layer pays for the budget, the loud one stays dense or keeps more rank
    assert ranks.get("loud", WIDTH) > ranks["quiet"]
    assert removed >= 0.3 - 0.02
    assert error < results["uniform"][2] / 2
