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


def tiny_llama():
    """A random 4-block Llama (real torch modules), logits out."""
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                           max_position_embeddings=64)
    model = T.LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    return model, {"input_ids": _ids(0)}


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(seed))


def test_measured_allocation_meets_the_ratio_with_less_divergence_than_uniform():
    """``allocation=measured`` on a real (random) Llama: at least the asked 30% of all
    parameters removed, and the logits stay closer to the dense model's on held-out tokens
    than uniform ranks at the same budget; damage is measured on held-apart batches."""
    held_out = [_ids(100 + s) for s in range(3)]
    results = {}
    for allocation in ("uniform", "measured"):
        ir, inputs = capture(load_model("tests.test_lowrank_allocation:tiny_llama"))
        reference = [ir.run([b])[0] for b in held_out]
        ctx = PassContext(example_inputs=inputs,
                          calibration_batches=[[_ids(s)] for s in range(1, 7)])
        pipeline = (f"lowrank{{method=whiten,ratio=0.3,round_to=4,allocation={allocation},"
                    "probe_keeps=0.3|0.5|0.7,bands=2,damage=kl}")
        PassManager(REGISTRY.passes).run(ir, validate(parse_pipeline_text(pipeline),
                                                      REGISTRY.passes), ctx)
        summary = ir.annotations["lowrank"]
        removed = 1 - summary["params_after"] / summary["params_before"]
        error = sum(relative_l2(r, ir.run([b])[0])
                    for r, b in zip(reference, held_out, strict=True))
        results[allocation] = (summary, removed, error)
    summary, removed, error = results["measured"]
    notes = summary["allocation"]["measured"]
    assert notes["held_apart"] and notes["probe_batches"] == 2 and notes["whiten_batches"] == 4
    assert len(notes["groups"]) == 7 * 2 + 1  # q k v o gate up down x 2 bands, lm_head
    assert 0.3 <= removed < 0.3 + 0.03
    assert error < results["uniform"][2]


def test_measured_allocation_cuts_the_quiet_layer_and_keeps_the_loud_one_dense():
    ir, inputs = capture(load_model("tests.test_lowrank_allocation:unequal"))
    ctx = PassContext(example_inputs=inputs, calibration_batches=_batches(range(4)))
    pipeline = "lowrank{method=whiten,ratio=0.3,round_to=4,allocation=measured," \
               "probe_keeps=0.2|0.5|0.8}"
    PassManager(REGISTRY.passes).run(ir, validate(parse_pipeline_text(pipeline),
                                                  REGISTRY.passes), ctx)
    summary = ir.annotations["lowrank"]
    groups = {k.split("@")[0]: v for k, v in summary["allocation"]["measured"]["groups"].items()}
    assert groups["loud"]["chosen"] == 1.0 and groups["quiet"]["chosen"] < 1.0
    assert "measured allocation: kept dense" in summary["skipped"]["loud"]
    assert 1 - summary["params_after"] / summary["params_before"] >= 0.3
    # the loud layer's every cut is measured 10^4 times as damaging as the quiet one's
    assert groups["loud"]["candidates"]["0.8"]["damage"] > \
        100 * groups["quiet"]["candidates"]["0.8"]["damage"]
