"""``sensitivity``: per-layer, per-setting output damage under one chosen criterion.

The front door to the criteria in :mod:`slimc.passes.analysis.criteria`. Each criterion is its
own analysis pass named ``sensitivity-<criterion>`` (registered through the ordinary
``slimc_register_passes`` hook, so a plugin adds criteria the way it adds passes), and
``sensitivity{criterion=NAME}`` resolves the name against the registry and asks the analysis
manager for it, so results are cached per criterion and options.
"""

from __future__ import annotations

from slimc.passes.analysis.criteria.base import SensitivityOptions, SensitivityResult

from slimc.errors import UsageError
from slimc.ir import IR
from slimc.passmanager import AnalysisPass, PassContext, PassOptions

CRITERION_PREFIX = "sensitivity-"


def available_criteria(passes: dict | None = None) -> list[str]:
    """Names of every registered criterion (``magnitude``, ``perturbation``, ...)."""
    if passes is None:
        from slimc.plugins import get_registry

        passes = get_registry().passes
    return sorted(name.removeprefix(CRITERION_PREFIX) for name, cls in passes.items()
                  if name.startswith(CRITERION_PREFIX) and cls.kind == "analysis")


def criterion_pass(criterion: str, passes: dict | None = None):
    """The pass class of ``criterion``; a UsageError naming the known ones if there is none."""
    if passes is None:
        from slimc.plugins import get_registry

        passes = get_registry().passes
    cls = passes.get(CRITERION_PREFIX + criterion.lower())
    if cls is None:
        raise UsageError(f"Unknown sensitivity criterion {criterion!r}.",
                         hint=f"Use one of: {', '.join(available_criteria(passes))}.")
    return cls


class SensitivityAnalysis(AnalysisPass):
    """Per-layer sensitivity curves under a criterion (magnitude/activation/taylor/hessian/...)."""

    name = "sensitivity"

    class Options(SensitivityOptions):
        criterion: str = "perturbation"
        #: Probes / label samples per batch for hessian and taylor (None: their default).
        samples: int | None = None
        #: ``perturbation``: ``disagree`` (measure where the proxies disagree) or ``all``.
        select: str | None = None

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> SensitivityResult:
        assert isinstance(options, SensitivityAnalysis.Options)
        cls = criterion_pass(options.criterion)
        wanted = set(cls.Options.model_fields)
        values = {k: v for k, v in options.model_dump().items() if k in wanted and v is not None}
        if ctx.analyses is not None:
            return ctx.analyses.get(cls.name, **values)
        return cls().run(ir, ctx, cls.Options(**values))
