"""Reading a user's ``.npy`` file (``slimc run --input NAME=file.npy``, ``--calib`` arrays).

``np.load`` alone answers a wrong file badly: an empty file raises ``EOFError`` (which the CLI
framework turned into a silent exit 130, as if Ctrl-C had been pressed), and a text file is
reported as "pickled (object) data ... load it unsafely using allow_pickle", advice slimc
must never give (a pickle runs code). The file is checked first, and every failure is one
:class:`UsageError` that says what the file is and how to make a real one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimc.errors import UsageError

_MAGIC = b"\x93NUMPY"
_HOW = "Save the array with numpy.save(path, array) (a numeric dtype, not Python objects)."


def read_npy(path: str | Path, what: str) -> np.ndarray:
    """The array in ``path``; ``what`` names the option for the error (``--input x``)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(len(_MAGIC))
    except IsADirectoryError:
        raise UsageError(f"{what}: {path} is a directory, not a .npy file.", hint=_HOW) from None
    except OSError as exc:
        raise UsageError(f"{what}: cannot read {path} ({exc.strerror or exc}).",
                         hint="Check the path and its permissions.") from None
    if not head:
        raise UsageError(f"{what}: {path} is empty (0 bytes), not a .npy array.", hint=_HOW)
    if head != _MAGIC:
        kind = "a .npz archive" if head.startswith(b"PK") else "not a .npy file"
        raise UsageError(f"{what}: {path} is {kind} (a .npy file starts with the bytes "
                         "\\x93NUMPY).", hint=_HOW)
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise UsageError(f"{what}: {path} holds Python objects (a pickle), which slimc "
                             "never loads: unpickling can run arbitrary code.",
                             hint=_HOW) from None
        raise UsageError(f"{what}: cannot read {path} as a .npy array ({exc}).",
                         hint=_HOW) from None
    except (OSError, EOFError) as exc:
        raise UsageError(f"{what}: {path} is cut short or damaged ({exc or 'end of file'}).",
                         hint=_HOW) from None
