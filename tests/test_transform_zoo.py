"""Every transform on every architecture of the test zoo (issue 13).

A transform that cannot handle a structure skips it and records why; it never crashes the
compile. IR-level for the whole zoo (each transform is verified by the pass manager: the IR
still runs and keeps its output shapes); one architecture that used to crash is compiled.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import slimc
from slimc.capture import capture, load_model
from slimc.loaders.base import LoadedModel
from slimc.passmanager import PassContext, PassManager
from slimc.pipeline import parse_pipeline_text, validate
from slimc.plugins import get_registry
from tests.models import FULL_CONFIG_ARCHS, HF_ARCHS, TEXT

torch.set_num_threads(2)
REGISTRY = get_registry()

TRANSFORMS = [
    "prune{ratio=0.3}",
    "quantize{weights=int8}",
    "quantize{weights=int4,group_size=16}",
    "lowrank{ratio=0.2,round_to=4}",
    "share{basis=true,ratio=0.2,round_to=4}",
    "share{blocks=true,ratio=0.2,round_to=4}",
]

#: Architectures whose pruning crashed (issue 13): Gemma3's per-head q/k norms, Phi-3's fused
#: qkv/gate_up projections with empty slices, BLOOM's fused, head-interleaved QKV.
EXTRA = {
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,
               {**TEXT, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 16}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM,
             {**TEXT, "num_key_value_heads": 2, "pad_token_id": 0, "eos_token_id": 0,
              "bos_token_id": 0}),
    "bloom": (T.BloomConfig, T.BloomForCausalLM,
              dict(n_embed=32, n_layer=2, n_head=4, vocab_size=128)),
}


def _extra(arch: str):
    config_cls, model_cls, kwargs = EXTRA[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).eval()
    model.config.use_cache = False
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}


def gemma3():
    return _extra("gemma3")


def phi3():
    return _extra("phi3")


def bloom():
    return _extra("bloom")


ZOO = [*HF_ARCHS, *FULL_CONFIG_ARCHS, "small_cnn", *EXTRA]


def _capture(arch: str, hf_dir):
    if arch == "small_cnn":
        return capture(load_model("tests.models:small_cnn"))
    if arch in EXTRA:
        model, inputs = _extra(arch)
        return capture(LoadedModel(name=arch, module=model, example_inputs=inputs,
                                   as_kwargs=True))
    return capture(load_model(hf_dir(arch)))


def _did_or_said_why(transform: str, ann: dict, before: int, after: int) -> bool:
    """The transform compressed something, or recorded why it did not."""
    name = transform.split("{")[0]
    if name == "prune":
        skipped = [g for g in ann.get("groups", []) if "skipped" in g]
        return ann.get("removed_units", 0) > 0 or bool(skipped) or not ann.get("groups")
    if name == "quantize":
        return ann["layers"] > 0
    if name == "lowrank":
        return ann["factorized"] > 0 or bool(ann["skipped"])
    return bool(ann["basis_groups"]) or bool(ann["tied_blocks"]) or bool(ann["skipped"]) \
        or after < before


@pytest.mark.parametrize("arch", ZOO)
def test_every_transform_runs_or_skips_with_a_reason(arch, hf_dir):
    ir, inputs = _capture(arch, hf_dir)
    ir.remove_unused_weights()
    ir.changed()
    shapes = [tuple(o.shape) for o in ir.run(inputs)]
    for transform in TRANSFORMS:
        work = ir.clone()
        ctx = PassContext(example_inputs=inputs)
        records = PassManager(REGISTRY.passes).run(
            work, validate(parse_pipeline_text(transform), REGISTRY.passes), ctx)
        before, after = records[-1].params_before, records[-1].params_after
        assert after <= before, transform
        ann = work.annotations[transform.split("{")[0]]
        assert _did_or_said_why(transform, ann, before, after), (transform, ann)
        assert [tuple(o.shape) for o in work.run(inputs)] == shapes, transform


@pytest.mark.parametrize("model,pipeline", [
    ("tests.test_transform_zoo:bloom", "prune{ratio=0.3},quantize{weights=int8}"),
    ("tests.test_transform_zoo:phi3", "prune{ratio=0.3},lowrank{ratio=0.2,round_to=4}"),
])
def test_formerly_crashing_architectures_compile(model, pipeline, tmp_path):
    res = slimc.compile_model(model, slimc.CompileOptions(pipeline=pipeline,
                                                           output=tmp_path / "out", threads=2))
    m = res.manifest
    assert m["verification"]["passed"]
    assert m["params_after"] < m["params_before"]
