"""``benchmarks/search_memory.py`` with per-component timers: where the -O2 search's damage
table spends its CPU (issue 18).

    python benchmarks/search_timers.py benchmarks/search_memory.py compile MODEL --target arm \\
        -O2 --emulate skip -o OUT --force --no-cache --json -q --input ...

Prints ``TIMERS {component: [thread CPU s, wall s summed over threads, calls]}`` after the
``SEARCH_RESULT`` line: the anchors' suffix forwards (``suffix_run``), making every choice's
approximation (``approximate_matrix``, of it the ``-fz`` grid searches and the content keys)
and the local errors (``energy_of_rows``). Thread CPU (``time.thread_time``) rather than wall:
the table runs one layer per core, and on a loaded host the wall time of a component says
little. A nested call of the same component is counted once.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import threading
import time

from slimc.passes.analysis.criteria import execution

import slimc.lowbit as lowbit
import slimc.search.damage as damage
import slimc.search.space as space

totals: dict[str, list[float]] = {}
lock = threading.Lock()
depth = threading.local()


def wrap(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    def timed(*args, **kwargs):
        level = getattr(depth, label, 0)
        setattr(depth, label, level + 1)
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(depth, label, level)
            if level == 0:
                with lock:
                    entry = totals.setdefault(label, [0.0, 0.0, 0])
                    entry[0] += time.thread_time() - cpu
                    entry[1] += time.perf_counter() - wall
                    entry[2] += 1

    setattr(owner, name, timed)


wrap(space, "approximate_matrix", "approximate_matrix")
wrap(space, "measure", "measure(table)")
wrap(execution.SuffixRunner, "run", "suffix_run")
wrap(lowbit, "_search_grid", "grid_search")
wrap(lowbit, "content_key", "content_key")
wrap(damage.ViewStats, "energy_of_rows", "energy_of_rows")


@atexit.register
def report() -> None:
    print("TIMERS " + json.dumps({k: [round(v[0], 1), round(v[1], 1), v[2]]
                                  for k, v in totals.items()}), flush=True)


_exit = os._exit


def exit_with_report(code: int) -> None:  # search_memory.py ends with os._exit
    report()
    _exit(code)


if __name__ == "__main__":
    os._exit = exit_with_report
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
