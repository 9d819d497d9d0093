"""The backend seam: what a code generator must provide to compile, load and run a target.

After LLVM's ``TargetMachine``: slimc's driver (``slimc/compiler.py``) knows no code generator
by name. Each :class:`~slimc.targets.TargetSpec` names its ``backend``; backends are registered
through the ``slimc_register_backends`` hook and own everything target-specific:

* :meth:`Backend.check` -- can this machine *build* for the target (toolchain present)?
* :meth:`Backend.target_info` -- the facts passes ask (:class:`TargetInfo`, like LLVM's TTI),
  so no pass parses target strings or reads ``/proc/cpuinfo``;
* :meth:`Backend.lower` / :meth:`Backend.build` -- IR -> backend module -> one library file;
* :meth:`Backend.load` / :meth:`Backend.run` -- run that library here, or raise
  :class:`DeviceUnavailable` when this machine has no such device (the artifact is then
  written marked unverified, like a cross artifact without an emulator);
* :meth:`Backend.describe` -- what ``slimc targets`` prints: what the target compiles to and
  what it needs to build, to run, and to verify an artifact.

Optionally, ``host_numerics(module, spec, inputs, entries)``: when the device is absent, run
the *same* lowered module (same casts, same precision) built for this machine's CPU, so an
fp16/bf16 artifact's numerics are still checked against the fp32 IR (GPU backends).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from slimc.errors import UsageError

if TYPE_CHECKING:
    from slimc.ir import IR
    from slimc.targets import TargetSpec


class DeviceUnavailable(RuntimeError):
    """This machine cannot run the library (no GPU, no emulator): build it, do not verify it."""


class RunFailed(RuntimeError):
    """The verification run started but did not finish: the emulator crashed, or it ran past
    its time budget (``timed_out``). Not a compiler bug: the artifact is written unverified
    (``--emulate auto``) or the compile stops with advice (``--emulate require``)."""

    def __init__(self, message: str, *, timed_out: bool, limit_s: float | None = None,
                 budget: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.limit_s = limit_s
        #: The budget the run had (``expected_s``, ``limit_s``, ``basis``), when there was one.
        self.budget = budget


@dataclass
class RunLimits:
    """What a verification run may cost, for backends whose run is slow (emulators).

    ``flops``/``weight_bytes`` describe one call of the model (from the ``cost`` analysis);
    ``timeout_s`` overrides any limit the backend would derive from them; ``progress``
    receives status lines while the run is under way. The backend records the budget it used
    in ``budget`` (JSON-ready) for the manifest.
    """

    flops: float = 0.0
    weight_bytes: float = 0.0
    timeout_s: float | None = None
    progress: Callable[[str], None] = lambda message: None
    budget: dict[str, Any] | None = None


@dataclass(frozen=True)
class WinogradRule:
    """Which 3x3 stride-1 float32 convolutions a backend runs as Winograd ``F(m x m, 3 x 3)``
    (``(m+2)²`` multiplies per output tile and channel pair instead of ``9 m²``), so cost
    decisions see the multiplies the target really does: a dense 3x3 conv on a large feature
    map costs ~4x fewer than its MAC count, which a factorization into 1x1 convs must beat."""

    #: fewest output tiles worth the transforms
    min_tiles: int
    #: largest direct filter (bytes) given 4x4 tiles, and given 2x2 tiles
    large_tile_max_filter_bytes: int
    small_tile_max_filter_bytes: int

    def tile(self, batch: int, out_h: int, out_w: int, channels_in: int,
             channels_out: int) -> int | None:
        """The output tile ``m`` for such a conv, or None: it stays a direct conv."""
        filter_bytes = 9 * channels_in * channels_out * 4
        limits = {4: self.large_tile_max_filter_bytes, 2: self.small_tile_max_filter_bytes}
        for m in (4, 2):
            tiles = batch * -(-out_h // m) * -(-out_w // m)
            if tiles >= self.min_tiles and filter_bytes <= limits[m]:
                return m
        return None

    def multiplies(self, batch: int, out_h: int, out_w: int, channels_in: int,
                   channels_out: int) -> int:
        """Multiplies of such a conv on this backend (direct: ``9 x`` pixels x channels)."""
        m = self.tile(batch, out_h, out_w, channels_in, channels_out)
        if m is None:
            return 9 * batch * out_h * out_w * channels_in * channels_out
        tiles = batch * -(-out_h // m) * -(-out_w // m)
        return tiles * (m + 2) ** 2 * channels_in * channels_out


@dataclass(frozen=True)
class TargetInfo:
    """Facts about a target that passes may ask (LLVM's TargetTransformInfo).

    ``vector_bits``: widest SIMD register (CPU) or warp width x 32 bits (GPU: the granularity
    at which channel counts stay efficient). ``dot_product``: the int8 dot-product instruction
    family the backend emits (``vnni``, ``avx2``, ``sdot``, ``dp4a``), None for none.
    ``formats``: weight formats the backend has kernels for (``qs``: the ``-qs`` grids).
    Throughput numbers come from the target's hardware entry (``backends/hardware.toml``) and
    carry its name and sources.
    """

    target: str
    device: str  # "cpu" or "gpu"
    arch: str  # LLVM triple (CPU), sm_XX (CUDA), or the TVM target kind
    vector_bits: int
    dot_product: str | None
    formats: tuple[str, ...]
    mem_bandwidth_gbs: float | None = None
    peak_gflops: dict[str, float] = field(default_factory=dict)
    hardware: str | None = None
    sources: tuple[str, ...] = ()
    #: Arithmetic precision of the lowered kernels (``fp32``, ``fp16``, ``bf16``; the last two
    #: accumulate matmuls and reductions in fp32, see :mod:`slimc.precision`).
    precision: str = "fp32"
    #: 3x3 convolutions the backend runs by Winograd (None: all direct).
    winograd: WinogradRule | None = None
    #: Fixed cost of one executed operator (hardware entry), microseconds.
    op_overhead_us: float | None = None

    @property
    def fp32_lanes(self) -> int:
        """fp32 values per vector register: the channel multiple that keeps kernels dense."""
        return max(1, self.vector_bits // 32)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["formats"] = list(self.formats)
        data["sources"] = list(self.sources)
        return data


@dataclass(frozen=True)
class TargetDescription:
    """What ``slimc targets`` says about a target."""

    compiles_to: str
    build_needs: str
    run_needs: str
    verified_by: str
    available: bool = True
    #: Why the target cannot be built at all (``available=False``).
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Runner = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


@runtime_checkable
class Backend(Protocol):
    """A code generator for one family of targets (registered by ``slimc_register_backends``).

    ``name`` is what :attr:`TargetSpec.backend` refers to; ``aliases`` are accepted too.
    ``kinds`` are the TVM target kinds (``llvm``, ``cuda``...) whose ad-hoc ``--target`` values
    (tags, JSON dicts) this backend takes. An optional ``supports_generation = True`` says its
    libraries can hold ``--generate``'s ``prefill``/``decode`` entry points: :meth:`run` then
    takes ``entries`` and the loaded runner exposes ``vm`` and ``device`` for the generation
    loop (``slimc/generation/loop.py``); other backends get a usage error for ``--generate``.
    """

    name: str
    aliases: tuple[str, ...]
    kinds: tuple[str, ...]

    def describe(self, spec: TargetSpec) -> TargetDescription:
        """Compiles-to / build / run / verification summary of ``spec``."""

    def check(self, spec: TargetSpec) -> None:
        """Raise :class:`~slimc.errors.UsageError` if this machine cannot build ``spec``."""

    def target_info(self, spec: TargetSpec) -> TargetInfo:
        """The facts passes ask about ``spec``."""

    def set_threads(self, threads: int | None) -> int:
        """Fix the host thread count the runtime uses; return it."""

    def plan_tuning(self, spec: TargetSpec, trials: int, minutes: float | None,
                    database: str | Path | None) -> Any:
        """Validate tuning options before any expensive work; return an opaque plan."""

    def open_tuner(self, plan: Any, spec: TargetSpec, progress: Callable[[str], None]) -> Any:
        """A tuner for :meth:`build` (``None`` when nothing is tuned); has ``.report``."""

    def lower(self, ir: IR, spec: TargetSpec, converters: dict[Any, Any]) -> Any:
        """Import ``ir`` into the backend's module form."""

    def build(self, module: Any, spec: TargetSpec, path: Path, *, tuning: Any = None) -> Path:
        """Compile ``module`` into one self-contained library file at ``path``."""

    def load(self, library: Path, manifest: dict[str, Any], threads: int | None,
             emulate: bool = False) -> Runner:
        """A callable running the artifact's ``library`` here (``manifest``: its
        ``manifest.json``); raises :class:`DeviceUnavailable`."""

    def run(self, library: Path, spec: TargetSpec, inputs: Sequence[np.ndarray],
            threads: int | None, *, limits: RunLimits | None = None) -> list[np.ndarray]:
        """Run ``library`` once (verification); raises :class:`DeviceUnavailable` when it
        cannot run here and :class:`RunFailed` when the run crashed or outlived ``limits``."""

    def required_isa(self, spec: TargetSpec) -> dict[str, Any] | None:
        """The host CPU instruction set the library needs (manifest ``isa``), or None."""

    def where(self, spec: TargetSpec) -> str:
        """Where :meth:`run` executes (``host (x86_64)``, ``qemu-aarch64``, ``cuda:0``...)."""


def get_backend(name: str, registry=None) -> Backend:
    """The backend registered as ``name`` (or one of its aliases)."""
    from slimc.plugins import get_registry

    registry = registry or get_registry()
    backend = registry.backends.get(name.lower())
    if backend is None:
        known = sorted({b.name for b in registry.backends.values()})
        raise UsageError(f"No backend {name!r} is registered.",
                         hint=f"Installed backends: {', '.join(known) or 'none'}; a plugin adds "
                         "one through the slimc_register_backends hook.")
    return backend


def backend_for_kind(kind: str, registry=None) -> Backend | None:
    """The backend that builds ad-hoc TVM targets of ``kind`` (first registered wins)."""
    from slimc.plugins import get_registry

    registry = registry or get_registry()
    for backend in dict.fromkeys(registry.backends.values()):
        if kind in backend.kinds:
            return backend
    return None
