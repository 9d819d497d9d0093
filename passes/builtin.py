"""Registers slimc's built-in passes through the public ``slimc_register_passes`` hook."""

from __future__ import annotations

from slimc.passes.analysis.model_stats import ModelStatsAnalysis
from slimc.passes.cleanup.eliminate_dead_code import EliminateDeadCode

from slimc.hookspec import hookimpl


@hookimpl
def slimc_register_passes():
    return [ModelStatsAnalysis, EliminateDeadCode]
