"""``target-info``: the facts about the compilation target that passes ask (LLVM's TTI).

Passes never parse target strings or read ``/proc/cpuinfo``: they ask this analysis, which asks
the target's backend (:meth:`slimc.backend.Backend.target_info`): SIMD / tensor-core vector
width, the int8 dot-product instruction family, the weight formats with kernels, and the
hardware entry's memory bandwidth and peak FLOP/s (with its sources).
"""

from __future__ import annotations

from slimc.backend import TargetInfo
from slimc.ir import IR
from slimc.passmanager import AnalysisPass, NoOptions, PassContext, PassOptions


class TargetInfoAnalysis(AnalysisPass):
    """Vector width, dot-product instructions, formats, bandwidth and peak FLOP/s of the
    target (the host's ``llvm`` target when none is set)."""

    name = "target-info"
    Options = NoOptions

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> TargetInfo:
        return target_info(ctx.target)


def target_info(spec) -> TargetInfo:
    """:class:`TargetInfo` of a :class:`~slimc.targets.TargetSpec` (None: the host)."""
    if spec is None or not hasattr(spec, "get_backend"):
        from slimc.targets import resolve_target

        spec = resolve_target(spec if isinstance(spec, str) else "llvm")
    return spec.get_backend().target_info(spec)
