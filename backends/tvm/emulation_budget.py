"""How long an emulated verification run may take, from what the model computes.

Why not a fixed timeout: under ``qemu-aarch64`` every guest instruction is translated, so a run
costs a fixed start (the emulated Python interpreter importing numpy and ``tvm_ffi``, loading
``libtvm_runtime``) plus time roughly proportional to the model's FLOPs and to the bytes of
weights the library loads.  A fixed 600 s was both far too long for a tiny model (a hung guest
kept the compile waiting ten minutes) and too short for a 270M-parameter decoder.

The rates below were measured on the 2-core x86-64 development host (``docs/benchmarks.md``,
"ARM compiles of a real LLM"): SmolLM2-135M at ``-O0`` (17 GFLOP per 64-token call) took 67 s
of CPU under qemu, ~0.29 GFLOP/s. int8-weight kernels ran ~3x slower than fp32 ones under qemu
(qemu 7.2 emulates the fixed-point ``scvtf`` that converts the weights one lane at a time);
since they convert each weight once per 4 rows they take ~1.4x fp32's time (1.6 GFLOP MLP:
7.0 s fp32, 20.8 -> 10.1 s int8), and the rate used stays the conservative one. The *expected*
time is an estimate for the current host (scaled by its load average, since other processes
take the emulator's cores) and the *limit* is a multiple of it. ``--emulate-timeout`` /
``SLIMC_EMULATE_TIMEOUT`` replace the limit outright.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Seconds the emulated Python needs before the first kernel runs (interpreter, numpy, tvm_ffi,
#: libtvm_runtime) on an idle host.
STARTUP_S = 5.0
#: Weight bytes per second the guest copies out of the library into runtime tensors.
LOAD_BYTES_PER_S = 100e6
#: Conservative emulated throughput of slimc's aarch64 kernels (FLOP/s) on an idle host.
EMULATED_FLOPS_PER_S = 0.1e9
#: The limit is this many times the expected time (before the load factor) ...
SAFETY = 4.0
#: ... and never below this, so a tiny model is not failed by a momentary stall.
MIN_LIMIT_S = 120.0
#: Environment variable with a limit in seconds (the CLI's ``--emulate-timeout``).
ENV_VAR = "SLIMC_EMULATE_TIMEOUT"


@dataclass(frozen=True)
class EmulationBudget:
    """The expected duration of one emulated run and the limit after which it is stopped."""

    expected_s: float
    limit_s: float
    #: Why this limit: the estimate's inputs, or the override that set it.
    basis: str

    def to_json(self) -> dict[str, float | str]:
        return {"expected_s": round(self.expected_s, 1), "limit_s": round(self.limit_s, 3),
                "basis": self.basis}


def host_load_factor() -> float:
    """How many runnable processes share each core right now (at least 1)."""
    try:
        load = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return 1.0
    return max(1.0, load / max(cores, 1))


def emulation_budget(flops: float, weight_bytes: float, override_s: float | None = None,
                     load_factor: float | None = None) -> EmulationBudget:
    """The budget for running a library of ``flops`` per call and ``weight_bytes`` of weights.

    ``override_s`` (else ``$SLIMC_EMULATE_TIMEOUT``) sets the limit; the expected time is
    still estimated so progress can say how far along the run should be.
    """
    expected = (STARTUP_S + max(weight_bytes, 0.0) / LOAD_BYTES_PER_S
                + max(flops, 0.0) / EMULATED_FLOPS_PER_S)
    factor = host_load_factor() if load_factor is None else max(1.0, load_factor)
    if override_s is None and os.environ.get(ENV_VAR):
        override_s = _parse_seconds(os.environ[ENV_VAR], ENV_VAR)
    if override_s is not None:
        return EmulationBudget(expected * factor, float(override_s),
                               f"set to {override_s:g}s by --emulate-timeout/{ENV_VAR}")
    limit = max(MIN_LIMIT_S, SAFETY * expected * factor)
    basis = (f"{flops / 1e9:.3g} GFLOP and {weight_bytes / 1e6:.0f} MB of weights at "
             f"~{EMULATED_FLOPS_PER_S / 1e9:g} GFLOP/s emulated, x{SAFETY:g} margin"
             + (f", x{factor:.1f} for the host's load" if factor > 1.0 else ""))
    return EmulationBudget(expected * factor, limit, basis)


def _parse_seconds(text: str, origin: str) -> float:
    from slimc.errors import UsageError

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{origin}={text!r} is not a positive number of seconds.",
                         hint=f"Set it to e.g. 900, or unset {ENV_VAR} to let slimc derive "
                         "the limit from the model's size.")
    return value
