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
