"""Where a compile's memory peaks: ``slimc compile`` in this process, with a thread recording
each new RSS high (+20 MB) and the slimc / TVM frames the main thread is in at that moment.

    python benchmarks/compile_memory_profile.py compile MODEL --target arm -O0 --emulate skip ...
    # -> the last highs on stderr: seconds, RSS GB, innermost frames first

Exploratory (one process, sampled every 50 ms): the peak of the compiling process only, not
of qemu or zig; ``/usr/bin/time -v`` gives the whole tree's (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

KEEP = ("slimc", "/tvm/", "backends", "passes")


def _rss_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def main() -> int:
    main_id = threading.get_ident()
    highs: list[tuple[float, float, list[str]]] = []
    stop = threading.Event()

    def watch() -> None:
        top, t0 = 0.0, time.time()
        while not stop.is_set():
            rss = _rss_gb()
            if rss > top + 0.02:
                top = rss
                frame = sys._current_frames().get(main_id)
                stack = [f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}"
                         for f in traceback.extract_stack(frame)
                         if any(k in f.filename for k in KEEP)][-6:]
                highs.append((round(time.time() - t0, 1), round(rss, 3), stack))
            stop.wait(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    from slimc.cli import main as slimc_main

    try:
        return slimc_main(sys.argv[1:])
    finally:
        stop.set()
        thread.join()
        for seconds, rss, stack in highs[-12:]:
            print(seconds, rss, " <- ".join(reversed(stack)), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
