"""Damage-table seconds of the budget search with and without the ``-qs`` candidates
(:data:`slimc.search.space.CODED_FORMATS`) on a random-weight Llama (issue 17, wt/qs24).

Usage: ``python benchmarks/qs_damage_table.py [hidden] [intermediate] [layers] [repeats]``.
After a warm-up, alternates the two format sets (a fresh pass context and an empty lowbit
grid cache each time) and prints the
median seconds of each and their ratio."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as T

from slimc import lowbit
from slimc.capture import capture, load_model
from slimc.passmanager import AnalysisManager, PassContext, PassManager
from slimc.plugins import get_registry
from slimc.search.space import CODED_FORMATS, Techniques, build_space


def main() -> None:
    hidden, inter, layers, repeats = (int(a) for a in (sys.argv[1:] + ["576", "1536", "2",
                                                                        "3"][len(sys.argv) - 1:]))
    config = T.LlamaConfig(hidden_size=hidden, intermediate_size=inter,
                           num_hidden_layers=layers, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=2048,
                           max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        T.LlamaForCausalLM(config).eval().save_pretrained(tmp)
        registry = get_registry()
        ir, example = capture(load_model(str(Path(tmp))))
    def fresh() -> PassContext:  # no analysis cached from the previous table
        ctx = PassContext(example_inputs=example)
        ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
        return ctx

    build_space(ir, fresh(), Techniques(formats=("int4-g32-fz",)), None)  # warm-up
    base = Techniques.named("all").formats
    sets = {"all": base, "all+qs": base + CODED_FORMATS}
    seconds: dict[str, list[float]] = {k: [] for k in sets}
    for _ in range(repeats):
        for name, formats in sets.items():
            lowbit._GRIDS.clear()
            start = time.perf_counter()
            build_space(ir, fresh(), Techniques(formats=formats), None)
            seconds[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"llama hidden={hidden} intermediate={inter} layers={layers}: "
          f"{len(base)} formats {med['all']:.2f} s, +{len(CODED_FORMATS)} -qs "
          f"{med['all+qs']:.2f} s, ratio {med['all+qs'] / med['all']:.3f} "
          f"(runs {seconds})")


if __name__ == "__main__":
    main()
