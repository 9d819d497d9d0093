"""``lowrank{only=embeddings|linears|convolutions}`` and ``|``-separated ``skip`` patterns
(issue 13): restricting the factorization to one kind of layer is what lets a pipeline spend
part of a parameter budget on the embedding table and the rest with another pass, e.g.
``lowrank{only=embeddings,ratio=0.168},prune{ratio=0.2791,budget=params}`` (40% in total)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import slimc
from slimc.capture import capture, load_model
from slimc.passmanager import PassContext, PassManager, relative_l2
from slimc.pipeline import parse_pipeline_text, validate
from slimc.plugins import get_registry

torch.set_num_threads(2)
REGISTRY = get_registry()
aten = torch.ops.aten


def tiny_bert():
    """A BERT encoder whose word-embedding table is most of its parameters (as in MiniLM)."""
    torch.manual_seed(0)
    config = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, vocab_size=1024, max_position_embeddings=64)
    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(1))
    return T.BertModel(config).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _ir(model: str):
    ir, inputs = capture(load_model(model))
    ir.remove_unused_weights()
    ir.changed()
    return ir, inputs


def _run(ir, inputs, pipeline: str):
    ctx = PassContext(example_inputs=inputs, calibration_batches=[])
    return PassManager(REGISTRY.passes).run(
        ir, validate(parse_pipeline_text(pipeline), REGISTRY.passes), ctx)


def _linear_shapes(ir) -> dict[str, tuple]:
    return {n.args[1].name: tuple(ir.get_weight(n.args[1]).shape)
            for n in ir.nodes("call_function") if n.target is aten.linear.default}


@pytest.mark.parametrize(("model", "ratio"), [("tests.test_lowrank_only:tiny_bert", 0.15),
                                              ("tests.test_quantize:medium_llama", 0.08)])
def test_only_embeddings_factorizes_the_tables_alone(model, ratio):
    ir, inputs = _ir(model)
    reference, linears = ir.run(inputs), _linear_shapes(ir)
    _run(ir, inputs, f"lowrank{{only=embeddings,ratio={ratio},round_to=1}}")
    ann = ir.annotations["lowrank"]
    assert ann["factorized"] >= 1
    assert all("embed" in name for name in ann["per_layer"])
    # every linear kept its dense weight (on the Llama that includes the untied lm_head)
    assert _linear_shapes(ir).items() >= linears.items()
    assert all(why == "only=embeddings" for name, why in ann["skipped"].items()
               if "embed" not in name)
    # the parameter count falls exactly by what the chosen ranks predict, close to the goal
    predicted = sum(v["params"][0] - v["params"][1] for v in ann["per_layer"].values())
    assert ann["params_before"] - ann["params_after"] == predicted == \
        ann["params_before"] - ir.num_params()
    assert abs(predicted / ann["params_before"] - ratio) < 0.01
    # the gather now reads the thin table (vocab x r); the r x d factor follows as a matmul
    word = next(v for k, v in ann["per_layer"].items() if "word" in k or "embed_tokens" in k)
    gathered = [tuple(ir.get_weight(n.args[0]).shape) for n in ir.nodes("call_function")
                if n.target is aten.embedding.default]
    assert any(shape[1] == word["rank"] for shape in gathered)
    out = ir.run(inputs)
    assert all(torch.isfinite(o).all() for o in out)
    assert relative_l2(reference, out) < 1.0


def test_only_linears_and_only_convolutions_leave_the_rest_dense():
    ir, inputs = _ir("tests.test_lowrank_only:tiny_bert")
    _run(ir, inputs, "lowrank{only=linears,ratio=0.2,round_to=8}")
    ann = ir.annotations["lowrank"]
    assert ann["factorized"] > 0 and not any("embed" in k for k in ann["per_layer"])
    ir, inputs = _ir("tests.test_lowrank_only:tiny_bert")
    _run(ir, inputs, "lowrank{only=convolutions,ratio=0.2,round_to=8}")
    ann = ir.annotations["lowrank"]
    assert ann["factorized"] == 0 and ann["params_after"] == ann["params_before"]
    assert set(ann["skipped"].values()) == {"only=convolutions"}


def test_skip_takes_bar_separated_patterns_in_pipeline_text():
    ir, inputs = _ir("tests.test_lowrank_only:tiny_bert")
    _run(ir, inputs, "lowrank{ratio=0.2,round_to=8,skip=*.query|*.key|pooler*}")
    ann = ir.annotations["lowrank"]
    skipped = {k for k, why in ann["skipped"].items() if why == "matched skip="}
    assert {k for k in skipped if k.endswith((".query", ".key"))} and "pooler.dense" in skipped
    assert not any(k.endswith((".query", ".key")) or k.startswith("pooler")
                   for k in ann["per_layer"])
    assert any(k.endswith(".value") for k in ann["per_layer"])


def test_bad_only_values_are_usage_errors(cli, hf_dir):
    res = cli("compile", hf_dir("bert"), "--pipeline", "lowrank{only=heads}")
    assert res.code == 2 and "only" in res.err and "embeddings" in res.err
    res = cli("compile", hf_dir("bert"), "--pipeline", "lowrank{only=linears,embeddings=true}")
    assert res.code == 2 and "excludes embeddings" in res.err


def test_embedding_then_prune_artifact_runs_and_verifies(tmp_path):
    """The MiniLM recipe's shape: the table factorized, then channels/heads pruned by a
    parameter budget; the compiled library matches the transformed IR."""
    res = slimc.compile_model("tests.test_lowrank_only:tiny_bert", slimc.CompileOptions(
        pipeline="lowrank{only=embeddings,ratio=0.15,round_to=8},"
                 "prune{ratio=0.2,budget=params,round_to=8}",
        output=tmp_path / "out", threads=2))
    m = res.manifest
    assert m["verification"]["passed"] and m["verification"]["relative_l2_vs_ir"] < 1e-4
    assert m["params_after"] < 0.7 * m["params_before"]
