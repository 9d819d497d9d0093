"""Registers slimc's built-in passes through the public ``slimc_register_passes`` hook."""

from __future__ import annotations

from slimc.passes.analysis.cost import CostAnalysis
from slimc.passes.analysis.criteria.activation import ActivationSensitivity
from slimc.passes.analysis.criteria.hessian import HessianSensitivity
from slimc.passes.analysis.criteria.magnitude import MagnitudeSensitivity
from slimc.passes.analysis.criteria.perturbation import PerturbationSensitivity
from slimc.passes.analysis.criteria.taylor import TaylorSensitivity
from slimc.passes.analysis.model_stats import ModelStatsAnalysis
from slimc.passes.analysis.sensitivity import SensitivityAnalysis
from slimc.passes.analysis.target_info import TargetInfoAnalysis
from slimc.passes.cleanup.eliminate_dead_code import EliminateDeadCode
from slimc.passes.distill.distill import Distill
from slimc.passes.lowrank.lowrank import LowRank
from slimc.passes.prune import Prune, PruneGroupsAnalysis
from slimc.passes.quantize.quantize import Quantize
from slimc.passes.rotate.rotate import Rotate
from slimc.passes.share.share import Share

from slimc.hookspec import hookimpl


@hookimpl
def slimc_register_passes():
    return [ModelStatsAnalysis, EliminateDeadCode, CostAnalysis, SensitivityAnalysis,
            MagnitudeSensitivity, ActivationSensitivity, TaylorSensitivity, HessianSensitivity,
            PerturbationSensitivity, Quantize, PruneGroupsAnalysis, Prune, TargetInfoAnalysis,
            LowRank, Share, Distill, Rotate]
