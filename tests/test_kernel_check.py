"""Big cross artifacts are verified kernel by kernel (issue 18): the module the aarch64 library
was built from runs the whole model on the host, and qemu calls each distinct kernel of the
written library once on the arguments the host run recorded. Real TVM builds, real qemu."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

TARGET = "arm-v8.2"


def test_policy_follows_the_estimated_emulated_cost(monkeypatch):
    from slimc.backends.tvm.cpu import TvmCpuBackend
    from slimc.backends.tvm.kernel_check import ENV_VAR

    from slimc.backend import RunLimits
    from slimc.errors import UsageError
    from slimc.targets import resolve_target

    backend, arm = TvmCpuBackend(), resolve_target(TARGET)
    monkeypatch.delenv(ENV_VAR, raising=False)
    tiny = RunLimits(flops=2e6, weight_bytes=1e5)
    assert backend.wants_kernel_check(arm, tiny) is None  # a test model: the whole run
    big = RunLimits(flops=40e9, weight_bytes=1.3e9)  # a 320M decoder on 64 tokens
    assert "under the emulator" in backend.wants_kernel_check(arm, big)
    assert backend.wants_kernel_check(resolve_target("x86-64-v3"), big) is None  # native
    monkeypatch.setenv(ENV_VAR, "0")
    assert backend.wants_kernel_check(arm, tiny) is not None
    monkeypatch.setenv(ENV_VAR, "soon")
    with pytest.raises(UsageError, match=ENV_VAR):
        backend.wants_kernel_check(arm, tiny)


def test_per_kernel_policy_verifies_a_decoder(aarch64_emulator, hf_dir, tmp_path, cli,
                                              monkeypatch):
    monkeypatch.setenv("SLIMC_KERNEL_CHECK_ABOVE_S", "0")  # forced on a tiny model
    out = tmp_path / "llama-arm"
    result = cli("compile", hf_dir("llama"), f"--target={TARGET}", "-o", out, "--no-cache",
                 "--emulate", "require", "--input", "input_ids=1x16:int64",
                 "--input", "attention_mask=1x16:int64")
    assert result.code == 0, result.err
    assert "verified kernel by kernel on qemu-aarch64" in result.out
    v = json.loads((out / "manifest.json").read_text())["verification"]
    assert v["passed"] is True and v["method"] == "per-kernel"
    assert v["ran_on"] == "qemu-aarch64"
    k = v["kernels"]
    # every distinct kernel the model calls ran once; the decoder calls them more often
    assert 10 <= k["checked"] <= k["total"] and k["calls_in_model"] > k["checked"]
    assert k["worst_relative_l2"] <= v["tolerance"] and v["relative_l2_vs_ir"] < 1e-5
    assert "kernel by kernel" in (out / "report.md").read_text()
    # where the emulated run's time went, from the guest's own stamps (timings.json: the
    # manifest keeps no wall seconds, so that equal builds give equal manifests)
    timings = json.loads((out / "timings.json").read_text())["elsewhere"]
    parts = timings["verification.seconds"]["emulator_parts"]
    assert {"interpreter_start", "imports", "library_load", "kernels", "save",
            "slowest_kernel"} <= set(parts)
    assert 0 <= parts["kernels"] <= parts["total"]


def test_per_kernel_policy_on_a_dynamic_artifact(aarch64_emulator, hf_dir, tmp_path, cli,
                                                  monkeypatch):
    """A dynamic-length artifact: the kernels are checked at the short check length, and the
    smallest size still runs whole under qemu (verify_sizes)."""
    monkeypatch.setenv("SLIMC_KERNEL_CHECK_ABOVE_S", "0")
    out = tmp_path / "llama-dyn"
    result = cli("compile", hf_dir("llama"), f"--target={TARGET}", "-o", out, "--no-cache",
                 "--emulate", "require", "--input", "input_ids=1x1..64:int64",
                 "--input", "attention_mask=1x1..64:int64")
    assert result.code == 0, result.err
    v = json.loads((out / "manifest.json").read_text())["verification"]
    assert v["method"] == "per-kernel" and v["passed"] is True
    assert v["sizes"] and [s["passed"] for s in v["shapes"]] == [True] * len(v["shapes"])


def _mlp(slope: float, seed: int):
    """An MLP whose LeakyReLU slope is compiled into its kernel (same kernel names and
    signatures for every slope) and whose weights (> 64 KB) live in the library's section."""
    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.LeakyReLU(slope),
                                torch.nn.Linear(256, 64)).eval()
    x = torch.randn(8, 128)
    ir, _ = capture(LoadedModel("mlp", model, {"x": x}))
    with torch.no_grad():
        return ir, x.numpy(), model(x).numpy()


def _build(ir, path, keep=None):
    from slimc.backends.tvm.build import build_library
    from slimc.backends.tvm.lower import lower_to_relax

    from slimc.plugins import get_registry
    from slimc.targets import resolve_target

    spec = resolve_target(TARGET)
    mod = lower_to_relax(ir, get_registry().converters, spec.tvm_target())
    return build_library(mod, spec, path, keep=keep)


def test_a_wrong_aarch64_kernel_is_caught(aarch64_emulator, tmp_path):
    """The check passes on the library the kernels were recorded for and fails on a library
    whose kernel computes something else (another slope compiled in), on one whose weight
    section holds other weights, and on a corrupted recorded output."""
    from slimc.backends.tvm.emulation import run_emulated
    from slimc.backends.tvm.kernel_check import compare, record_on_host, write_plan

    ir, x, want = _mlp(0.01, seed=0)
    keep: dict = {}
    good = _build(ir, tmp_path / "good.so", keep)
    wrong_code = _build(_mlp(0.5, seed=0)[0], tmp_path / "slope.so")
    wrong_weights = _build(_mlp(0.01, seed=1)[0], tmp_path / "weights.so")

    record = record_on_host(keep["scheduled"], keep["weights"], [x], threads=1)
    np.testing.assert_allclose(record.outputs[0], want, rtol=1e-4, atol=1e-4)
    assert record.weights_from_library >= 2  # both weight matrices come from the section
    plan = write_plan(record, str(tmp_path / "args.npz"))

    def check(library):
        outputs = run_emulated(library, [], threads=1, kernels=(str(tmp_path / "args.npz"),
                                                                  plan))
        return compare(record, outputs, 1e-4)

    worst, _, failed = check(good)
    assert failed == [] and worst < 1e-5
    _, name, failed = check(wrong_code)  # only the kernel with the slope compiled in
    assert len(failed) == 1 and "leaky_relu" in name and name in failed[0], failed
    _, _, failed = check(wrong_weights)  # both matmuls read the section's weights
    assert len(failed) == 2, failed
    emulated = run_emulated(good, [], threads=1, kernels=(str(tmp_path / "args.npz"), plan))
    record.cases[0].expected[0] = record.cases[0].expected[0] + 1.0
    _, name, failed = compare(record, emulated, 1e-4)
    assert name == record.cases[0].name and len(failed) == 1


def test_a_guest_started_before_the_build_checks_the_library_handed_to_it(aarch64_emulator,
                                                                           tmp_path):
    """The compile starts the per-kernel guest before the library exists (its start-up under
    qemu overlaps the build); it waits on stdin, then checks the library and plan it is given.
    A guest that is never handed one (the build or the host's half failed) is stopped."""
    from slimc.backends.tvm.emulation import KernelGuest
    from slimc.backends.tvm.kernel_check import compare, record_on_host, write_plan

    guest = KernelGuest(aarch64_emulator, threads=1)
    idle = KernelGuest(aarch64_emulator, threads=1)
    ir, x, _ = _mlp(0.01, seed=0)
    keep: dict = {}
    library = _build(ir, tmp_path / "model.so", keep)
    record = record_on_host(keep["scheduled"], keep["weights"], [x], threads=1)
    plan = write_plan(record, str(tmp_path / "args.npz"))
    timings: dict = {}
    with guest:
        outputs = guest.run(library, (str(tmp_path / "args.npz"), plan), timings=timings)
    worst, _, failed = compare(record, outputs, 1e-4)
    assert failed == [] and worst < 1e-5 and len(outputs) == len(record.cases)
    # the guest's own stamps: it was ready before the host handed it the plan
    assert timings["waited_for_host"] >= 0 and {"imports", "library_load", "kernels"} <= set(
        timings)
    assert idle._proc.poll() is None  # still waiting for a plan
    # its own process group (stopped as a whole), in the compile's session: the same scheduler
    # autogroup, so the compile's priority (nice) applies to the emulator too
    assert os.getpgid(idle._proc.pid) == idle._proc.pid != os.getpgid(0)
    assert os.getsid(idle._proc.pid) == os.getsid(0)
    idle.close()
    assert idle._proc.poll() is not None
