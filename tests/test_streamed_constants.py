"""Weights kept out of the executable: a raw section of the library that the VM reads in place
(issue 18: peak memory of real-size compiles and of loading the artifact), and a tied embedding
stored once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch

TARGET = "x86-64-v3"


def _mlp_ir(widths=(256, 512, 128)):
    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel

    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).eval()
    x = torch.randn(4, widths[0])
    ir, _ = capture(LoadedModel("mlp", model, {"x": x}))
    with torch.no_grad():
        return ir, x.numpy(), model(x).numpy()


def _library_ranges(path) -> list[tuple[int, int]]:
    """Address ranges this process has the file at ``path`` mapped at, found by its inode:
    the runtime loads libraries through a temporary hard link (``load_library``), so the
    mapping carries that link's name, not ``path``."""
    import os

    inode = os.stat(path).st_ino  # not the device: overlayfs maps show the lower one
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and int(fields[4]) == inode:
                lo, hi = fields[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def test_weights_are_views_into_the_mapped_library(tmp_path):
    """The executable holds no large constant: the VM reads each weight where the library is
    mapped (no copy), and the result matches PyTorch."""
    from slimc.backends.tvm.build import build_library
    from slimc.backends.tvm.lower import lower_to_relax
    from slimc.backends.tvm.runtime import NativeRunner
    from slimc.backends.tvm.streamed_constants import WEIGHT_FUNCTION

    from slimc.targets import resolve_target

    ir, x, want = _mlp_ir()
    path = build_library(lower_to_relax(ir), resolve_target(TARGET), tmp_path / "model.so")
    runner = NativeRunner(path, threads=1)
    (got,) = runner([x])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    import tvm

    library = tvm.runtime.load_module(str(path)).imports[0]  # the executable's: the .so itself
    fetch = library[WEIGHT_FUNCTION]
    weights = [fetch(0), fetch(1)]  # the two 64 KB+ matrices; the biases stay in the executable
    assert sorted(int(np.prod(w.shape)) for w in weights) == [128 * 512, 256 * 512]
    ranges = _library_ranges(path)
    for w in weights:
        address = np.from_dlpack(w).ctypes.data
        assert address % 64 == 0
        assert any(lo <= address < hi for lo, hi in ranges), "weight copied out of the library"
    assert fetch(0).same_as(fetch(0))  # made once, cached
    try:
        fetch(2)
    except Exception as exc:  # noqa: BLE001 - tvm-ffi maps the C error kind
        assert "no such weight" in str(exc)
    else:
        raise AssertionError("weight index out of range was accepted")


def test_libraries_with_weights_in_the_executable_still_load(tmp_path):
    """Artifacts written before this change (every constant inside the serialized executable,
    embedded with .incbin) load and run as before."""
    import tvm
    from slimc.backends.tvm.blob_pack import pack_imports_incbin
    from slimc.backends.tvm.lower import lower_to_relax
    from slimc.backends.tvm.runtime import NativeRunner
    from slimc.backends.tvm.schedules import cpu_pipeline
    from tvm import relax

    from slimc.targets import resolve_target

    ir, x, want = _mlp_ir()
    target = resolve_target(TARGET).tvm_target()
    with tvm.transform.PassContext(opt_level=3):
        executable = relax.build(lower_to_relax(ir), target=target,
                                 relax_pipeline=cpu_pipeline(target))
    path = tmp_path / "old.so"
    executable.export_library(str(path), fpack_imports=pack_imports_incbin)
    (got,) = NativeRunner(path, threads=1)([x])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


_LOAD_RSS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from slimc.backends.tvm.runtime import NativeRunner

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

    x = np.ones((4, 2048), "float32")
    import tvm  # noqa: F401 - the runtime's own memory is not the load's
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    start = status("VmRSS:")
    runner = NativeRunner(sys.argv[1], threads=1)
    runner([x])
    print(json.dumps({"start": start, "peak": status("VmHWM:"), "end": status("VmRSS:")}))
""")


def test_loading_keeps_about_one_copy_of_the_weights_resident(tmp_path):
    """A library with 64 MB of weights, loaded and run once in a fresh process: the peak RSS
    rises by about the weights once (the mapped pages), not 4x as when the runtime copied the
    executable twice and then every constant out of it (measured: +268 MB for 67 MB)."""
    import slimc

    result = slimc.compile_model("tests.models:mlp_64mb", slimc.CompileOptions(
        output=tmp_path / "out", target=TARGET, threads=1, cache=False))
    assert result.manifest["verification"]["passed"] is True
    weights = 4 * 2048 * 2048 * 4
    proc = subprocess.run([sys.executable, "-c", _LOAD_RSS, str(result.output / "model.so")],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    rise = rss["peak"] - rss["start"]
    assert rise < 1.5 * weights, (rise / weights, rss)


def test_tied_embedding_is_stored_once(tmp_path):
    """A tied 32768-token vocabulary: the library holds the table once, and it is verified."""
    import transformers

    import slimc

    config = transformers.LlamaConfig(
        vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "tied")
    result = slimc.compile_model(str(tmp_path / "tied"), slimc.CompileOptions(
        output=tmp_path / "out", threads=1, cache=False,
        inputs=("input_ids=1x16:int64", "attention_mask=1x16:int64")))
    assert result.manifest["verification"]["passed"]
    table = 32768 * 64 * 4
    others = (result.manifest["params_before"] - 32768 * 64) * 4
    library = (result.output / "model.so").stat().st_size
    assert table + others <= library < 1.5 * table + others + 2_000_000
