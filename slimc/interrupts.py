"""Ctrl-C and SIGTERM stop a compile promptly, whatever the native code in between does.

Python turns a signal into an exception only between bytecodes of the main thread, and TVM's
FFI turns a ``KeyboardInterrupt`` raised inside one of its callbacks into an ordinary error that
a broad ``except`` in schedule code may swallow. So the handler installed by
:func:`handle_signals` *records* the signal before it raises:

* :func:`check` re-raises it at every stage boundary and right before an artifact is swapped
  into place (under :data:`commit_lock`), so a swallowed interrupt cannot let a compile finish;
* a watchdog thread ends the process with ``128 + signal`` after :data:`GRACE_SECONDS` if the
  main thread has not unwound by then (e.g. LLVM is still compiling one big function); it
  takes :data:`commit_lock` first and removes the registered staging folders, so the old
  artifact is never half-replaced and no ``.*.partial`` folder is left behind.

Exit codes follow the shell convention: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: Seconds the main thread gets to unwind after a signal before the watchdog ends the process.
GRACE_SECONDS = 5.0

#: Held while an artifact is swapped into place; the watchdog waits for it.
commit_lock = threading.Lock()

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The user (SIGINT) or the system (SIGTERM) asked slimc to stop."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class _State:
    depth: int = 0
    signum: int | None = None
    unwound: threading.Event | None = None


_state = _State()
_staging: set[Path] = set()


def received() -> int | None:
    """The signal received inside the current :func:`handle_signals` block, if any."""
    return _state.signum


def check() -> None:
    """Raise :class:`Interrupted` if a signal arrived (even if its exception was swallowed)."""
    if _state.signum is not None:
        raise Interrupted(_state.signum)


def register_staging(path: Path) -> None:
    """Remember a staging folder the watchdog must remove if it has to end the process."""
    _staging.add(path)


def unregister_staging(path: Path) -> None:
    _staging.discard(path)


def _watchdog(signum: int, unwound: threading.Event) -> None:
    if unwound.wait(GRACE_SECONDS):
        return
    with commit_lock:  # never end the process in the middle of an artifact swap
        if unwound.is_set():
            return
        for path in list(_staging):
            shutil.rmtree(path, ignore_errors=True)
        os.write(2, f"slimc: stopped by {signal.Signals(signum).name}\n".encode())
        os._exit(128 + signum)


def _handler(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    if _state.signum is None:
        _state.signum = signum
        if _state.unwound is not None:
            threading.Thread(target=_watchdog, args=(signum, _state.unwound),
                             name="slimc-interrupt-watchdog", daemon=True).start()
    raise Interrupted(signum)


@contextmanager
def handle_signals() -> Iterator[_State]:
    """Install the recording SIGINT/SIGTERM handlers for the block (main thread only;
    re-entrant). On the way out, an error caused by an interrupt becomes :class:`Interrupted`."""
    if threading.current_thread() is not threading.main_thread():
        yield _state
        return
    if _state.depth:  # nested (slimc.cli.main around compile_model): the outer block handles it
        _state.depth += 1
        try:
            yield _state
        finally:
            _state.depth -= 1
        return
    previous = {s: signal.getsignal(s) for s in _HANDLED}
    _state.depth, _state.signum, _state.unwound = 1, None, threading.Event()
    for s in _HANDLED:
        signal.signal(s, _handler)
    try:
        yield _state
    except Interrupted:
        raise
    except BaseException as exc:
        if _state.signum is not None:  # e.g. TVM's RuntimeError wrapping our KeyboardInterrupt
            raise Interrupted(_state.signum) from exc
        raise
    finally:
        _state.unwound.set()
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state.depth = 0
