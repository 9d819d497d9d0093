"""Structured pruning (issue 4): dependency groups, importance, removal, reconstruction.

Modules: :mod:`labels` (channel-label propagation, the dependency engine), :mod:`groups`
(the ``prune-groups`` analysis), :mod:`importance`, :mod:`shapes` (removal and shape-constant
rewriting), :mod:`reconstruct` (least-squares / bias refit), :mod:`prune` (the ``prune`` pass).
"""

from slimc.passes.prune.groups import PruneGroupsAnalysis
from slimc.passes.prune.prune import Prune

__all__ = ["Prune", "PruneGroupsAnalysis"]
