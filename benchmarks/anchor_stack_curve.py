"""Thread CPU seconds per anchor forward of the damage table, separately and stacked with
``torch.vmap`` in batches of 2, 4 and 8 (issue 18: how much batching the anchors can save).

    python benchmarks/anchor_stack_curve.py /tmp/mem-bench/llama-320m-random

One torch thread, the example inputs cut to 64 tokens, a suffix from the middle block's
first weight (as the -O2 search's anchors run).
"""

from __future__ import annotations

import sys
import time

import torch
from slimc.passes.analysis.criteria.execution import SuffixRunner

from slimc.capture import capture, load_model
from slimc.loaders.base import parse_overrides
from slimc.plugins import get_registry


def main(model: str) -> None:
    torch.set_num_threads(1)
    ir, example = capture(load_model(model, parse_overrides([]), get_registry()))
    example = [e[:, :64] for e in example]
    weights = ir.weights()
    names = [n for n in weights if weights[n].dim() == 2]
    name = names[len(names) // 2]
    runner = SuffixRunner(ir, example, [name])
    values = [weights[name] + 0.01 * torch.randn_like(weights[name]) for _ in range(8)]

    def run(v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(runner.run({name: v}))

    run(values[0])
    cpu = time.thread_time()
    for v in values[:4]:
        run(v)
    print("separate: CPU s per anchor", round((time.thread_time() - cpu) / 4, 3), flush=True)
    for k in (2, 4, 8):
        torch.vmap(run)(torch.stack(values[:k]))
        cpu = time.thread_time()
        torch.vmap(run)(torch.stack(values[:k]))
        print(f"stacked {k}: CPU s per anchor", round((time.thread_time() - cpu) / k, 3),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
