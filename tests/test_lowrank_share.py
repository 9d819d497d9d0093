"""Low-rank factorization (``lowrank``), tensor sharing (``share``) and the IR services they
use (issue 13): real tiny models, real TVM builds for a few artifacts."""

from __future__ import annotations

import logging
import re

import pytest
import torch

import slimc
from slimc.capture import capture, load_model
from slimc.ir import IR
from slimc.observe import observe
from slimc.passmanager import PassContext, PassManager, relative_l2
from slimc.pipeline import parse_pipeline_text, validate
from slimc.plugins import get_registry

torch.set_num_threads(2)
REGISTRY = get_registry()
aten = torch.ops.aten


# -- models (factories usable as `tests.test_lowrank_share:<name>`) --------------------------


class TwinLinears(torch.nn.Module):
    """Two layers holding bit-identical weights in separate parameters (what a checkpoint
    saved without tying, or a copied block, looks like): ``share`` must store them once."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, width)
        self.b.load_state_dict(self.a.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def twin_linears():
    torch.manual_seed(0)
    return TwinLinears().eval(), (torch.randn(4, 256),)


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class Stack(torch.nn.Module):
    """Residual blocks of one shape: basis sharing groups adjacent ``layers.<i>.fc``."""

    def __init__(self, width: int = 192, depth: int = 4) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def stack():
    torch.manual_seed(0)
    return Stack().eval(), (torch.randn(8, 192),)


def medium_llama():
    from tests.test_quantize import medium_llama as build

    return build()


def smol_llama():
    """SmolLM2-135M's structure at toy size: 9 query heads sharing 3 K/V heads (head dim 16),
    tied embedding and head, three blocks, MLP 384 wide."""
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=144, intermediate_size=384, num_hidden_layers=3,
                           num_attention_heads=9, num_key_value_heads=3, vocab_size=512,
                           tie_word_embeddings=True, max_position_embeddings=64)
    model = T.LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    return model, {"input_ids": _ids(1, vocab=512)}


def _ir(model: str):
    ir, inputs = capture(load_model(model))
    ir.remove_unused_weights()
    ir.changed()
    return ir, inputs


def _run(ir: IR, inputs, pipeline: str, calib=None):
    ctx = PassContext(example_inputs=inputs, calibration_batches=calib or [])
    return PassManager(REGISTRY.passes).run(
        ir, validate(parse_pipeline_text(pipeline), REGISTRY.passes), ctx)


def _ids(seed: int, shape=(1, 16), vocab: int = 1024) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# -- IR services -----------------------------------------------------------------------------


def test_clone_is_independent_keeps_ties_and_hash_is_content(tmp_path):
    ir, inputs = capture(load_model("tests.test_prune:gpt2"))  # lm_head and wte: one storage
    twin = ir.clone()
    assert twin.content_hash() == ir.content_hash()

    def ties(x: IR) -> list[list[str]]:
        by_ptr: dict[int, list[str]] = {}
        for key, value in x.program.state_dict.items():
            by_ptr.setdefault(value.data_ptr(), []).append(key)
        return sorted(v for v in by_ptr.values() if len(v) > 1)

    assert ties(twin) == ties(ir) == [["lm_head.weight", "transformer.wte.weight"]] \
        or ties(twin) == ties(ir) == [["transformer.wte.weight", "lm_head.weight"]]
    assert twin.num_params() == ir.num_params()
    node = next(n for n in twin.nodes("placeholder") if n.name.endswith("c_fc_weight"))
    twin.set_weight(node, twin.get_weight(node) * 2)
    assert twin.content_hash() != ir.content_hash()
    assert relative_l2(ir.run(inputs), twin.run(inputs)) > 1e-3
    # stable across processes: what a reloaded archive hashes to is what was saved
    again = IR.load(ir.save(tmp_path / "ir.pt2"))
    assert again.content_hash() == ir.content_hash()


def test_observe_sees_each_linear_input():
    ir, inputs = _ir("tests.test_lowrank_share:stack")
    linears = [n for n in ir.nodes("call_function") if n.target is aten.linear.default]
    seen = {}
    observe(ir, [inputs, inputs], {n: lambda n, args, out: seen.setdefault(n.name, []).append(
        (args[0].shape, out.shape)) for n in linears})
    assert set(seen) == {n.name for n in linears}
    assert all(v == [((8, 192), (8, 192))] * 2 for v in seen.values())


# -- lowrank ---------------------------------------------------------------------------------


def _factor_pairs(ir: IR) -> list[tuple[torch.Size, torch.Size]]:
    """(inner V, outer U) weight shapes of every linear fed by a linear."""
    pairs = []
    for node in ir.nodes("call_function"):
        inner = node.args[0] if node.args else None
        if node.target is aten.linear.default and getattr(inner, "target", None) is \
                aten.linear.default:
            pairs.append((ir.get_weight(inner.args[1]).shape, ir.get_weight(node.args[1]).shape))
    return pairs


@pytest.mark.parametrize("method", ["svd", "whiten", "asvd"])
def test_lowrank_removes_the_predicted_parameters_as_two_real_linears(method):
    ir, inputs = _ir("tests.test_lowrank_share:medium_llama")
    before = ir.num_params()
    _run(ir, inputs, f"lowrank{{method={method},ratio=0.25,round_to=16}}")
    ann = ir.annotations["lowrank"]
    predicted = sum(v["params"][0] - v["params"][1] for v in ann["per_layer"].values())
    assert before - ir.num_params() == predicted
    assert abs(predicted / before - 0.25) < 0.03
    pairs = _factor_pairs(ir)
    assert len(pairs) == ann["factorized"] == 15  # 7 per layer x 2 + lm_head
    for (r, k), (n, r2) in pairs:
        assert r == r2 and r % 16 == 0 and r * (n + k) < n * k


def test_whitened_svd_beats_plain_svd_on_held_out_inputs():
    """SVD-LLM's point: truncating in the activation metric keeps the outputs, not W. Inputs
    that live near a 24-dimensional subspace of 192 are what real activations look like."""
    mix = torch.randn(24, 192, generator=torch.Generator().manual_seed(5))

    def batch(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(8, 24, generator=g) @ mix + 0.01 * torch.randn(8, 192, generator=g)]

    errors = {}
    for method in ("svd", "whiten", "asvd"):
        ir, inputs = _ir("tests.test_lowrank_share:stack")
        reference = ir.run(batch(99))
        _run(ir, inputs, f"lowrank{{method={method},ratio=0.4}}", [batch(s) for s in range(8)])
        errors[method] = relative_l2(reference, ir.run(batch(99)))
    assert errors["whiten"] < 0.2 * errors["svd"]
    assert errors["asvd"] < errors["svd"]


def test_energy_threshold_and_tied_embedding_factors(hf_dir):
    ir, inputs = _ir("tests.test_prune:gpt2")
    _run(ir, inputs, "lowrank{method=svd,energy=0.5,embeddings=true,round_to=4}")
    ann = ir.annotations["lowrank"]
    emb = next(v for k, v in ann["per_layer"].items() if "wte" in k)
    assert emb["rank"] % 4 == 0 and emb["predicted_loss"] <= 0.5
    # the tied head reads the same U as the gather: one factor pair serves both
    readers = [{user.target for user in n.users} for n in ir.nodes("placeholder")
               if n.name.endswith("_lr_u")]
    assert {aten.embedding.default, aten.linear.default} in readers
    assert all(v["rank"] * sum(v["shape"]) < v["shape"][0] * v["shape"][1]
               for v in ann["per_layer"].values())


def test_bad_options_are_usage_errors(cli, hf_dir):
    res = cli("compile", hf_dir("llama"), "--pipeline", "lowrank{ratio=0.2,energy=0.9}")
    assert res.code == 2 and "either ratio" in res.err
    res = cli("compile", hf_dir("llama"), "--pipeline", "share{group=1}")
    assert res.code == 2 and "group" in res.err


# -- share -----------------------------------------------------------------------------------


def test_dedup_stores_identical_tensors_once(tmp_path):
    dense = slimc.compile_model("tests.test_lowrank_share:twin_linears", slimc.CompileOptions(
        pipeline="eliminate-dead-code", output=tmp_path / "dense", threads=2)).manifest
    shared = slimc.compile_model("tests.test_lowrank_share:twin_linears", slimc.CompileOptions(
        pipeline="share", output=tmp_path / "shared", threads=2)).manifest
    assert shared["verification"]["passed"]
    one = 256 * 257 * 4
    assert dense["weight_bytes_after"] == 2 * one and shared["weight_bytes_after"] == one
    cov = next(p["summary"]["coverage"] for p in shared["pipeline"] if p["pass"] == "share")
    assert cov["reached_bytes"] == 2 * one  # both copies are now one shared tensor
    assert (tmp_path / "shared" / "report.md").read_text().count("Weight coverage") == 1
    # The library holds one copy either way (TVM already merges bit-identical constants):
    # sharing must not add any.
    assert shared["library_bytes"] <= dense["library_bytes"] < one * 1.3


def test_basis_sharing_stores_the_basis_once_in_model_so(tmp_path):
    dense = slimc.compile_model("tests.test_lowrank_share:stack", slimc.CompileOptions(
        pipeline="eliminate-dead-code", output=tmp_path / "dense", threads=2)).manifest
    res = slimc.compile_model("tests.test_lowrank_share:stack", slimc.CompileOptions(
        pipeline="share{basis=true,ratio=0.3,group=4}", output=tmp_path / "shared",
        threads=2))
    shared = res.manifest
    assert shared["verification"]["passed"]
    saved = dense["weight_bytes_after"] - shared["weight_bytes_after"]
    assert saved > 0.25 * dense["weight_bytes_after"]
    # Every byte the IR saved is gone from the library: the basis read by four layers is one
    # constant (a copy per reader would add 3 x r x 192 floats back).
    assert dense["library_bytes"] - shared["library_bytes"] > 0.9 * saved


def test_basis_sharing_in_the_ir():
    ir, inputs = _ir("tests.test_lowrank_share:medium_llama")
    before = ir.num_params()
    records = _run(ir, inputs, "share{basis=true,ratio=0.2}")
    ann = ir.annotations["share"]
    assert abs((before - ir.num_params()) / before - 0.2) < 0.03
    for g in ann["basis_groups"]:
        assert len(g["layers"]) == 2 and g["layers"][0].replace(".0.", ".1.") == g["layers"][1]
    bases = [n for n in ir.nodes("placeholder") if n.name.endswith("_shared_basis")]
    assert bases and all(len(b.users) == 2 for b in bases)
    assert records[-1].fidelity["relative_l2_vs_previous"] < 0.05
    assert "lm_head" in ann["tie"] and "would change the model" in ann["tie"]
    # Coverage: the grouped layers' bytes are reached; the untied head and the embedding are
    # listed as untouched with their reason, never silently.
    cov = ann["coverage"]
    grouped = sum(g["params"][0] for g in ann["basis_groups"]) * 4
    # (plus the bit-identical norm vectors dedup merged: random init leaves them all ones)
    assert cov["reached_bytes"] >= grouped and 0 < cov["reached_fraction"] < 1
    reasons = {g["reason"]: g for g in cov["untouched"]}
    assert any("embedding" in r for r in reasons), reasons
    assert sum(g["bytes"] for g in cov["untouched"]) + cov["reached_bytes"] \
        == cov["weight_bytes"]


# -- composition -----------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", [
    "prune{ratio=0.2},lowrank{ratio=0.2},quantize{weights=int8}",
    "lowrank{ratio=0.2},prune{ratio=0.2},quantize{weights=int4,group_size=32}",
])
def test_prune_lowrank_quantize_compose_in_either_order(pipeline):
    ir, inputs = _ir("tests.test_lowrank_share:medium_llama")
    reference = ir.run(inputs)
    records = _run(ir, inputs, pipeline)
    params = [r.params_after for r in records]
    assert params[0] < records[0].params_before and params[1] < params[0]
    assert relative_l2(reference, ir.run(inputs)) < 0.3
    # the factor matrices themselves were quantized (one packed weight per factor)
    factors = [n for n in ir.nodes("placeholder")
               if re.search(r"_lr_[uv]_int[48]_weight$", n.name)]
    assert len(factors) == 2 * ir.annotations["lowrank"]["factorized"] > 0
    # what ran first survives: pruned units stay removed, packed factors keep rank shapes
    assert any(g["kept"] < g["units"] for g in ir.annotations["prune"]["groups"])
    ranks = {v["rank"] for v in ir.annotations["lowrank"]["per_layer"].values()}
    assert all(min(ir.get_weight(n).shape) <= max(ranks) for n in factors)


class _Errors(logging.Handler):
    """Collects ERROR records of torch's loggers (fake-tensor propagation logs a failed shape
    rewrite there even when the pass catches it and skips the group). Torch's loggers do not
    propagate, so the handler goes on each of them."""

    @staticmethod
    def loggers() -> list[logging.Logger]:
        names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "torch"]
        return [logging.getLogger(n) for n in ["torch", *names]]

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


FIDELITY = 0.85
LOWRANK = "lowrank{only=linears,ratio=0.2}"
PRUNE = "prune{ratio=0.3333,budget=params,reconstruct=lsq,gqa=query}"


def test_lowrank_then_prune_then_quantize_on_a_gqa_llama():
    """SmolLM2's failure (issue 13): after ``lowrank`` the least-squares refit gave factor
    layers a new bias whose output channels were pruned too, unsliced, so every MLP-width and
    query-head group was skipped with a torch broadcast error. Ranks here (q: 56, k/v: 24)
    are not multiples of the head dim (16)."""
    ir, inputs = _ir("tests.test_lowrank_share:smol_llama")
    calib = [[_ids(seed, vocab=512)] for seed in range(10, 14)]
    held_out = [_ids(99, vocab=512)]
    errors = _Errors()
    for log in _Errors.loggers():
        log.addHandler(errors)
    try:
        records = _run(ir, inputs, LOWRANK, calib)
        factorized = ir.run(held_out)
        records += _run(ir, inputs, PRUNE + ",quantize{weights=int8}", calib)
    finally:
        for log in _Errors.loggers():
            log.removeHandler(errors)
    assert not errors.records, errors.records[0].getMessage()[:300]
    lowrank, prune, _quantize = records
    groups = ir.annotations["prune"]["groups"]
    assert not [g for g in groups if "skipped" in g]
    # every coupled group lost units: query heads (6 of 9), MLP width and the factor ranks
    assert all(g["kept"] < g["units"] for g in groups)
    assert {g["kind"] for g in groups} == {"mlp-channel", "query-head"}
    # the parameter budget: a third of the factorized model's parameters (rounding: +-3%)
    assert abs(prune.params_after / prune.params_before - (1 - 0.3333)) < 0.03
    assert lowrank.params_after < 0.85 * lowrank.params_before
    # earlier compression survives: every factor pair still there, packed, ranks only shrank
    ranks = {v["rank"] for v in ir.annotations["lowrank"]["per_layer"].values()}
    assert 56 in ranks
    factors = [n for n in ir.nodes("placeholder") if re.search(r"_lr_[uv]_int8_weight$", n.name)]
    assert len(factors) == 2 * ir.annotations["lowrank"]["factorized"] == 2 * 7 * 3
    assert all(min(ir.get_weight(n).shape) <= max(ranks) for n in factors)
    # fidelity vs the factorized model on a held-out input: random weights make removing a
    # third costly (0.745 measured; pruning the dense model alone to the same count: 0.68)
    assert relative_l2(factorized, ir.run(held_out)) < FIDELITY


@pytest.mark.parametrize("method", ["none", "lsq"])
def test_pruning_a_factorized_gqa_llama_equals_masking_it(method):
    """Pruning through factor pairs is exact: removing query heads, MLP channels and factor
    ranks of a factorized Llama (with the refit's new biases) gives the same outputs as
    zeroing every slice of the removed channels in the same weights."""
    from slimc.passes.prune import reconstruct
    from slimc.passes.prune.prune import apply, choose
    from slimc.passes.prune.shapes import removed_mask

    ir, inputs = _ir("tests.test_lowrank_share:smol_llama")
    calib = [[_ids(seed, vocab=512)] for seed in range(10, 14)]
    _run(ir, inputs, LOWRANK, calib)
    ctx = PassContext(example_inputs=inputs)
    PassManager(REGISTRY.passes).run(ir, validate(parse_pipeline_text("prune-groups"),
                                                  REGISTRY.passes), ctx)
    result = ctx.analyses.get("prune-groups")
    groups = result.prunable({"mlp-channel", "query-head"})
    scores = {g.index: torch.rand(len(g.units), generator=torch.Generator().manual_seed(g.index))
              for g in groups}
    plan = choose(groups, scores, 0.3, "uniform", 1)
    roots = {r for g in groups for i in plan[g.index] for r in g.units[i].roots}
    created = reconstruct.refit(ir, result, roots, calib, method) if method != "none" else {}
    assert bool(created) == (method == "lsq")  # factor layers got biases on pruned channels
    masked = ir.clone()
    removed = removed_mask(result.propagation, result.roots, roots)
    nodes = {n.name: n for n in masked.nodes("placeholder")}
    for (weight, axis), ids in {**result.propagation.members, **created}.items():
        drop = (ids >= 0) & removed[ids.clamp(min=0)]
        value = masked.get_weight(nodes[weight]).clone()
        value.index_fill_(axis, drop.nonzero().reshape(-1), 0.0)
        masked.set_weight(nodes[weight], value)
    params = ir.num_params()
    apply(ir, result, roots, created)
    assert ir.num_params() < 0.8 * params
    held_out = [_ids(99, vocab=512)]
    assert relative_l2(masked.run(held_out), ir.run(held_out)) < 1e-5


def test_lowrank_prune_quantize_artifact_of_a_gqa_llama_matches(tmp_path):
    res = slimc.compile_model("tests.test_lowrank_share:smol_llama", slimc.CompileOptions(
        pipeline=f"{LOWRANK},{PRUNE},quantize{{weights=int8}}", output=tmp_path / "lpq",
        threads=2))
    m = res.manifest
    assert m["verification"]["passed"] and m["verification"]["relative_l2_vs_ir"] < 1e-4
    assert m["weight_bytes_after"] < 0.25 * m["weight_bytes_before"]


def test_factorized_artifact_runs_and_is_smaller(tmp_path):
    res = slimc.compile_model("tests.test_lowrank_share:stack", slimc.CompileOptions(
        pipeline="lowrank{ratio=0.4,method=svd},quantize{weights=int8}",
        output=tmp_path / "lr", threads=2))
    m = res.manifest
    assert m["verification"]["passed"] and m["verification"]["relative_l2_vs_ir"] < 1e-4
    assert m["weight_bytes_after"] < 0.2 * m["weight_bytes_before"]
