"""An emulator that runs out of time (or crashes) never becomes an internal error.

`--emulate auto` writes the artifact marked unverified (console warning, manifest, report);
`--emulate require` exits 2 saying what to do. The budget is forced tiny (0.01 s: qemu cannot
even start the guest's Python in that time) through `--emulate-timeout` / the env variable.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from slimc.backends.tvm.emulation import EmulationError, EmulationTimeout, run_emulated
from slimc.backends.tvm.emulation_budget import ENV_VAR, emulation_budget

import slimc
from slimc.errors import UsageError

TINY = "tests.models:small_cnn"


@pytest.fixture(scope="module")
def unverified(aarch64_emulator, tmp_path_factory):
    """A tiny arm compile whose emulated run gets 0.01 s under --emulate auto."""
    out = tmp_path_factory.mktemp("budget") / "cnn-arm"
    progress: list[str] = []
    result = slimc.compile_model(TINY, slimc.CompileOptions(
        target="arm", output=out, emulate="auto", emulate_timeout=0.01),
        progress=progress.append)
    return result, progress


def test_auto_writes_an_unverified_artifact_with_a_warning(unverified):
    result, progress = unverified
    v = result.manifest["verification"]
    assert v["passed"] is None and v["ran_on"] is None
    assert "budget" in v["reason"] and v["timed_out"] is True
    # load-dependent, so kept out of the manifest's identity (timings.json)
    budget = result.timings["elsewhere"]["verification.run_budget"]
    assert budget["limit_s"] == pytest.approx(0.01)
    assert any("NOT verified" in w and "--emulate-timeout" in w for w in result.warnings)
    assert (result.output / "model.so").is_file()
    on_disk = json.loads((result.output / "manifest.json").read_text())
    assert on_disk["verification"]["passed"] is None
    assert "**Not verified**" in (result.output / "report.md").read_text()
    # progress said what runs and how long it should take
    assert any("under qemu-aarch64" in p and "expected" in p for p in progress)


def test_require_exits_2_and_says_what_to_do(aarch64_emulator, tmp_path, cli, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "0.01")
    out = tmp_path / "cnn-arm"
    result = cli("compile", TINY, "--target=arm", "-o", out, "-q", "--emulate", "require")
    assert result.code == 2, result.err
    text = " ".join(result.err.split())
    assert "Could not verify" in text and "budget" in text
    assert "--emulate-timeout" in text and "shorter input" in text
    assert "Traceback" not in result.err and "internal error" not in text
    assert not out.exists()


def test_a_crashing_guest_is_an_emulation_error(unverified, aarch64_emulator, tmp_path):
    result, _ = unverified
    broken = tmp_path / "model.so"
    data = (result.output / "model.so").read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # a valid ELF header, truncated body
    with pytest.raises(EmulationError) as err:
        run_emulated(broken, [np.zeros((1, 3, 32, 32), np.float32)], emulator=aarch64_emulator)
    assert not isinstance(err.value, EmulationTimeout)
    assert "failed" in str(err.value)


def test_budget_grows_with_flops_and_weights_and_the_override_wins(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    small = emulation_budget(1e9, 1e6, load_factor=1.0)
    big = emulation_budget(1e12, 1e9, load_factor=1.0)
    assert big.expected_s > small.expected_s and big.limit_s > small.limit_s
    assert big.limit_s > big.expected_s
    busy = emulation_budget(1e12, 1e9, load_factor=4.0)
    assert busy.limit_s > big.limit_s
    assert emulation_budget(1e12, 1e9, override_s=5.0).limit_s == 5.0
    monkeypatch.setenv(ENV_VAR, "7")
    assert emulation_budget(1e12, 1e9).limit_s == 7.0
    monkeypatch.setenv(ENV_VAR, "soon")
    with pytest.raises(UsageError):
        emulation_budget(1e9, 1e6)


def test_bad_timeout_option_is_a_usage_error(cli, tmp_path):
    result = cli("compile", TINY, "--target=arm", "-o", tmp_path / "x", "--emulate-timeout", "0")
    assert result.code == 2
    assert "--emulate-timeout" in result.err


@pytest.mark.parametrize("policy", ["auto", "require"])
def test_a_per_kernel_guest_out_of_time_is_unverified_or_exit_2(aarch64_emulator, tmp_path, cli,
                                                                monkeypatch, policy):
    """The per-kernel check's guest starts before the build; its budget (0.01 s from when it
    is handed the plan) still ends the check: an unverified artifact with a warning under
    auto, exit 2 under require."""
    monkeypatch.setenv("SLIMC_KERNEL_CHECK_ABOVE_S", "0")  # per kernel on a tiny model
    monkeypatch.setenv(ENV_VAR, "0.01")
    out = tmp_path / "cnn-arm"
    result = cli("compile", TINY, "--target=arm", "-o", out, "--no-cache", "--emulate", policy)
    text = " ".join(result.err.split())
    assert "Traceback" not in result.err and "internal error" not in text
    if policy == "require":
        assert result.code == 2 and "Could not verify" in text and "budget" in text
        assert not out.exists()
        return
    assert result.code == 0, result.err
    v = json.loads((out / "manifest.json").read_text())["verification"]
    assert v["passed"] is None and v["timed_out"] is True and "NOT verified" in text
