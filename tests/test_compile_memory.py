"""What a compile lets go of before the backend writes the library (issue 18: peak memory of
real-size ARM compiles): the IR's weights once lowered, the Relax functions once built."""

from __future__ import annotations

import numpy as np
import torch

import slimc
from slimc.capture import capture, load_model
from slimc.loaders.base import parse_overrides
from slimc.plugins import get_registry


def test_release_weights_keeps_shapes_and_frees_the_data(hf_dir):
    ir, _ = capture(load_model(hf_dir("llama"), parse_overrides([]), get_registry()))
    before = {k: (tuple(v.shape), v.dtype) for k, v in ir.weights().items()}
    released = ir.release_weights()
    assert released >= ir.weight_bytes() > 0
    after = ir.weights()
    assert {k: (tuple(v.shape), v.dtype) for k, v in after.items()} == before
    assert all(v.device.type == "meta" for v in after.values())


def test_build_releases_the_relax_functions(tmp_path):
    from slimc.backends.tvm.build import build_library
    from slimc.backends.tvm.lower import lower_to_relax
    from tvm import relax

    from slimc.capture import capture as capture_loaded
    from slimc.loaders.base import LoadedModel
    from slimc.targets import resolve_target

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()).eval()
    ir, _ = capture_loaded(LoadedModel("mlp", model, {"x": torch.randn(2, 8)}))
    mod = lower_to_relax(ir)
    assert any(isinstance(f, relax.Function) for _, f in mod.functions_items())
    library = build_library(mod, resolve_target("llvm"), tmp_path / "m.so")
    assert library.is_file()
    assert not any(isinstance(f, relax.Function) for _, f in mod.functions_items())


def test_compile_with_released_weights_is_verified_and_keeps_the_ir_when_asked(hf_dir, tmp_path):
    """A plain compile runs without the IR's weights after lowering; --save-ir keeps them (the
    saved IR loads and runs)."""
    plain = slimc.compile_model(hf_dir("llama"), slimc.CompileOptions(
        output=tmp_path / "plain", threads=1, cache=False))
    assert plain.manifest["verification"]["passed"]
    assert plain.manifest["params_after"] == plain.manifest["params_before"] > 0
    kept = slimc.compile_model(hf_dir("llama"), slimc.CompileOptions(
        output=tmp_path / "kept", threads=1, cache=False, save_ir=True))
    from slimc.ir import IR

    saved = IR.load(kept.output / "ir.pt2")
    assert all(v.device.type == "cpu" for v in saved.weights().values())
    inputs = np.load(kept.output / "example_inputs.npz")
    outputs = saved.run([torch.from_numpy(inputs[n]) for n in saved.input_names])
    assert all(torch.isfinite(o).all() for o in outputs)


def test_shared_weight_clone_costs_no_copy_and_edits_stay_its_own(hf_dir):
    """``IR.clone(share_weights=True)`` (the search's candidates): the same tensors, its own
    tables, so replacing a weight in the clone leaves the original untouched."""
    ir, example = capture(load_model(hf_dir("llama"), parse_overrides([]), get_registry()))
    before = ir.content_hash()
    twin = ir.clone(share_weights=True)
    ours, theirs = ir.weights(), twin.weights()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() for k in ours)
    node = next(n for n in twin.nodes("placeholder") if "q_proj" in n.name)
    twin.set_weight(node, torch.zeros_like(twin.get_weight(node)))
    twin.changed()
    assert ir.content_hash() == before and twin.content_hash() != before
    assert [torch.equal(a, b) for a, b in zip(ir.run(example), ir.clone().run(example),
                                               strict=True)] == [True] * len(ir.output_names)


def test_cached_example_outputs_do_not_keep_an_ir_alive(hf_dir):
    """The pass context caches an IR's outputs on the example; the cache must not hold the IR
    (a search copies the context into every candidate, which kept the original model's
    weights alive through the chosen candidate's build)."""
    import gc
    import weakref

    from slimc.passmanager import PassContext

    ir, example = capture(load_model(hf_dir("llama"), parse_overrides([]), get_registry()))
    ctx = PassContext(example_inputs=example)
    first = ctx.outputs_on_examples(ir)
    assert ctx.outputs_on_examples(ir) is first  # still served from the cache
    alive = weakref.ref(ir)
    del ir
    gc.collect()
    assert alive() is None and ctx.example_outputs is not None
