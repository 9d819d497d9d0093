"""``eliminate-dead-code``: drop ops whose results nothing uses, and weights nothing reads.

Transforms that reroute data (folding, pruning) leave such nodes behind; removing them keeps
the artifact's weight bytes honest. Side-effecting ops (asserts, in-place updates) are kept.
"""

from __future__ import annotations

from slimc.ir import IR
from slimc.passmanager import PassContext, PassOptions, PreservedAnalyses, TransformPass


class EliminateDeadCode(TransformPass):
    """Remove unused ops and unused weights."""

    name = "eliminate-dead-code"
    exact = True

    class Options(PassOptions):
        pass

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> PreservedAnalyses:
        before = sum(1 for _ in ir.nodes())
        ir.graph.eliminate_dead_code()
        ir.drop_dead_ops()  # also unused dropout / asserts torch's DCE keeps
        removed_weights = ir.remove_unused_weights()
        removed_ops = before - sum(1 for _ in ir.nodes()) - removed_weights
        ir.annotations["eliminate-dead-code"] = {"ops": removed_ops, "weights": removed_weights}
        if removed_ops == 0 and removed_weights == 0:
            return PreservedAnalyses.all()
        return PreservedAnalyses.none()
