"""``-j/--jobs``: how many cores the compiler itself uses (not the compiled model).

The parts of a compile or analysis that parallelise run on torch's intra-op thread pool
(calibration forwards, statistics, GPTQ/SVD factorizations, the perturbation forwards of
``slimc analyze``) or on a pool of one worker per job (the per-layer W8A8 searches,
:func:`slimc.passes.quantize.activations.search_all`, which run single-threaded ops each).
Both read :func:`torch.get_num_threads`, so one setting sizes them. The default is every core
the process may use. TVM's own build is single-threaded here and the artifact's runtime
threads are ``--threads``, a separate setting.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from slimc.errors import UsageError


def default_jobs() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_jobs(jobs: int | None) -> int:
    """``jobs`` checked (a UsageError for anything below 1), or the default."""
    if jobs is None:
        return default_jobs()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"--jobs {jobs!r}: the number of compile threads must be a whole "
                         "number of at least 1.",
                         hint=f"Leave it out to use every core ({default_jobs()} here), or "
                         "pass e.g. -j 1 on a shared machine.")
    return jobs


@contextlib.contextmanager
def compile_jobs(jobs: int | None) -> Iterator[int]:
    """Run the block with torch's thread pool sized to ``jobs``; the previous size after."""
    import torch

    n = resolve_jobs(jobs)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
