"""``model-stats``: parameter count, weight bytes and an op histogram of the IR.

Cheap and exact; the compiler reads it before and after the pipeline to fill the manifest's
``params_*`` and ``weight_bytes_*``, and any pass may ask for it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from slimc.ir import IR
from slimc.passmanager import AnalysisPass, PassContext, PassOptions


@dataclass(frozen=True)
class ModelStats:
    params: int
    weight_bytes: int
    ops: int
    op_histogram: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class ModelStatsAnalysis(AnalysisPass):
    """Count parameters, weight bytes and ops by type."""

    name = "model-stats"

    class Options(PassOptions):
        pass

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> ModelStats:
        histogram = Counter(
            str(n.target).removeprefix("aten.").split(".")[0] for n in ir.nodes("call_function")
        )
        return ModelStats(params=ir.num_params(), weight_bytes=ir.weight_bytes(),
                          ops=sum(histogram.values()), op_histogram=dict(histogram.most_common()))
