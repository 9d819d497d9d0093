"""Keep third-party chatter (TVM's C++ log lines, transformers' progress bars) off the terminal.

TVM writes warnings straight to file descriptor 2 from C++, so Python's logging cannot filter
them; :func:`native_stderr_to` swaps the descriptor for a file while TVM works and gives the
text back, so an error can still show it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def native_stderr_to(sink: list[str]) -> Iterator[None]:
    """Redirect fd 2 into a temp file for the block; append what was written to ``sink``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))


def silence_libraries() -> None:
    """Quiet transformers' progress bars/info logs and torch's pytree deprecation chatter."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
