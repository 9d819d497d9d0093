"""The memoised frame lookup that keeps TVMScript parsing cheap (``script_frames.py``)."""

from __future__ import annotations

import importlib
import inspect

from slimc.backends.tvm.script_frames import memoised_frame_modules


def _frame_modules() -> list[tuple[str, str | None]]:
    """(file, owning module's name) for every frame on the stack, as ``inspect.stack()``
    (what ``T.prim_func`` calls) resolves them."""
    return [(info.filename, getattr(inspect.getmodule(info.frame, info.filename),
                                    "__name__", None)) for info in inspect.stack()]


def test_frames_resolve_to_the_same_modules_and_the_lookup_is_restored():
    original = inspect.getmodule
    plain = _frame_modules()
    with memoised_frame_modules():
        assert inspect.getmodule is not original
        with memoised_frame_modules():  # re-entrant: the inner block keeps the outer memo
            patched = inspect.getmodule
            assert _frame_modules()[1:] == plain[1:]
        assert inspect.getmodule is patched
        assert _frame_modules()[1:] == plain[1:]  # second lookup: from the memo
        # Objects that are not frames take the original path.
        assert inspect.getmodule(inspect.stack) is inspect
        assert inspect.getmodule(importlib) is importlib
    assert inspect.getmodule is original


def test_a_tvm_script_kernel_parses_inside_the_block():
    """``T.prim_func`` with a closure variable (resolved through the outer frames)."""
    from tvm.script import tirx as T

    width = 8
    with memoised_frame_modules():

        @T.prim_func(private=True)
        def fill(a: T.Buffer((width,), "float32")):
            for i in range(width):
                a[i] = T.float32(1)

    assert "(8,)" in fill.script()  # the closure variable was found
