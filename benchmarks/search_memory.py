"""``slimc compile ... -O2`` (or any searching level), stopped right after the search: its
CPU-s, peak RSS (sampled every 0.2 s with the stage it was in), ``seconds_by_phase``, the
candidates and the chosen recipe, on one JSON line starting ``SEARCH_RESULT``. Why: on a
shared host the whole compile with qemu takes 30+ minutes; the search is where -O2's memory
and time went (issue 18, docs/benchmarks.md "Eighth round").

    python benchmarks/search_memory.py compile MODEL --target arm -O2 --emulate skip ...
    CAP_GB=2.9     # end the process above this RSS (default 2.9)
    ALL_FORMATS=1  # -O2 with int3/int2 among its formats (as before the eighth round)
    NO_TRIM=1      # without the damage table's and the candidates' heap trims
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time

import slimc.search.driver as driver
import slimc.search.search as search_module
import slimc.search.space as space
from slimc.cli import main

CAP = float(os.environ.get("CAP_GB", "2.9"))
T0 = time.time()
peak = [0.0]
phase = ["start"]
highs: list[tuple[float, float, str]] = []


def rss_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return 0.0


def watch() -> None:
    while True:
        now = rss_gb()
        if now > peak[0] + 0.02:
            peak[0] = now
            highs.append((round(time.time() - T0, 1), round(now, 3), phase[0]))
        if now > CAP:
            print(f"WATCHDOG: RSS {now:.2f} GB > {CAP} GB, stopping", file=sys.stderr,
                  flush=True)
            print(json.dumps(highs[-15:]), file=sys.stderr, flush=True)
            os._exit(3)
        time.sleep(0.2)


def cpu_s(usage) -> float:
    return usage.ru_utime + usage.ru_stime


real_search = driver.run_search
real_measure = space.measure


def run_search(plan, ir, ctx, *args, **kwargs):
    phase[0] = "search"
    before = resource.getrusage(resource.RUSAGE_SELF)
    start_rss = rss_gb()
    _, entry = real_search(plan, ir, ctx, *args, **kwargs)
    after = resource.getrusage(resource.RUSAGE_SELF)
    out = {"search_cpu_s": round(cpu_s(after) - cpu_s(before), 1),
           "cpu_s_total": round(cpu_s(after), 1), "wall_s": round(time.time() - T0, 1),
           "rss_at_search_start_gb": round(start_rss, 3),
           "peak_rss_gb_sampled": round(peak[0], 3),
           "ru_maxrss_gb": round(after.ru_maxrss / 2**20, 3), "load": os.getloadavg(),
           "search_s": entry.get("seconds"), "chosen": entry.get("chosen"),
           "seconds_by_phase": entry.get("seconds_by_phase"),
           "candidates": [(c["pipeline"], c["relative"]["size"], c["drop"], c["choices"],
                           c.get("predicted_damage"))
                          for c in entry.get("candidates", [])],
           "highs": highs[-12:]}
    print("SEARCH_RESULT " + json.dumps(out), flush=True)
    os._exit(0)


def measure(*args, **kwargs):
    phase[0] = "damage table"
    try:
        return real_measure(*args, **kwargs)
    finally:
        phase[0] = "candidates"


if __name__ == "__main__":
    threading.Thread(target=watch, daemon=True).start()
    driver.run_search = run_search  # the compiler imports it from the driver at call time
    space.measure = measure
    if os.environ.get("NO_TRIM"):
        space.trim_heap = search_module.return_freed_memory = lambda: False
    if os.environ.get("ALL_FORMATS"):
        space.Techniques.named = classmethod(
            lambda cls, name: cls() if name == "precision" else cls(
                lowrank_keeps=(0.5, 0.25), prune_ratios=(0.0, 0.2)))
    sys.exit(main(sys.argv[1:]))
