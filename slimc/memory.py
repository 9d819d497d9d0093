"""Give freed memory back to the operating system during a compile.

Why: glibc's allocator keeps freed blocks in its heap for reuse, and a weight-sized block freed in
the middle of the heap is not returned until ``malloc_trim`` asks for it. A compile frees whole
copies of the model between stages (the module's weights once lowered, the Relax constants once
built) and then serializes the library, its largest allocation: without a trim those freed
copies still count in the process's resident memory at that peak (measured on a 4-layer
SmolLM2-shaped model: 130 MB of 170 MB of weights came back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def return_freed_memory() -> bool:
    """Collect garbage, then return the allocator's free memory to the OS (glibc only);
    True when a trim ran."""
    gc.collect()
    return trim_heap()


def trim_heap() -> bool:
    """Return the allocator's free memory to the OS without a garbage collection (cheap
    enough to call between steps of a loop); True when a trim ran. Why: the damage table
    makes and drops a few weight-sized tensors per layer, and on SmolLM2 the freed blocks
    left in glibc's heap grew the process by ~1 GB over the table (issue 18)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
