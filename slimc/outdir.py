"""Which output directories slimc may replace, checked before the expensive work starts.

slimc replaces ``-o DIR`` only when DIR is empty or is an artifact slimc wrote: its
``manifest.json`` lists the files slimc wrote (``files``), or, for artifacts from before that
field, it names a library whose sha256 matches. Anything else (a web app's folder that happens to
hold a ``manifest.json``) is refused with exit 2. Files a user added to an old artifact are never
deleted silently: the compile is refused and names them, unless ``--force`` is given (then they
go with the old artifact).

Staging folders are named ``.<name>.<pid>.<random>.partial`` so that a later run can remove
those left behind by a process that died (SIGKILL, segfault), and restore ``.<name>.old-<pid>``
if a process died between the two renames of a swap.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from slimc.errors import UsageError
from slimc.manifest import MANIFEST, is_plain_name, sha256_of

#: What artifacts written before the ``files`` field could hold.
_LEGACY_FILES = ("manifest.json", "model.so", "report.md", "example_inputs.npz", "ir.pt2")


def owned_files(directory: Path) -> set[str] | None:
    """Relative paths of the files slimc wrote in ``directory``; None if slimc did not write it."""
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("slimc_version"), str):
        return None
    files = data.get("files")
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return set(files) | {MANIFEST}
    library = data.get("library")
    if not (isinstance(library, str) and is_plain_name(library)
            and (directory / library).is_file()
            and sha256_of(directory / library) == data.get("sha256")):
        return None
    owned = set(_LEGACY_FILES) | {library}
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, str) and is_plain_name(tokenizer) and (directory / tokenizer).is_dir():
        owned |= {f"{tokenizer}/{p.name}" for p in (directory / tokenizer).iterdir()}
    return owned


def list_files(directory: Path) -> list[str]:
    """Every file below ``directory`` as a sorted list of relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if not p.is_dir())


def check_output_directory(final: Path, *, force: bool = False) -> Path:
    """Raise a UsageError unless ``final`` can be (re)placed by a new artifact; return it
    absolute. Cheap: run it before loading the model."""
    final = check_can_create(final)
    if final.is_dir() and any(final.iterdir()):
        owned = owned_files(final)
        if owned is None:
            raise UsageError(f"{final} exists and is not a slimc artifact; slimc will not "
                             "overwrite it.", hint="Choose another -o directory or remove it.")
        foreign = [f for f in list_files(final) if f not in owned]
        if foreign and not force:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more"
                                              if len(foreign) > 5 else "")
            raise UsageError(f"{final} is a slimc artifact that also holds files slimc did not "
                             f"write ({shown}); replacing it would delete them.",
                             hint="Move them out, choose another -o, or pass --force to "
                             "replace the directory with them.")
    return final


def check_can_create(final: Path) -> Path:
    """Raise a UsageError unless the directory ``final`` exists or can be created and written
    (not a file, nor under one, nor on a read-only or unwritable place); return it absolute.
    ``slimc explore`` checks this before its search, which takes minutes."""
    final = Path(os.path.abspath(final))
    if final.exists() and not final.is_dir():
        raise UsageError(f"-o {final} is an existing file, not a directory.",
                         hint="Give -o a new or artifact directory.")
    ancestor = final.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"-o {final}: {ancestor} is a file, so the directory cannot be "
                         "created.", hint="Choose another -o directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"-o {final}: {ancestor} is not writable.",
                         hint="Choose a directory you can write to.")
    _probe_writable(final, ancestor)
    return final


def _probe_writable(final: Path, ancestor: Path) -> None:
    """Create and remove a folder in ``ancestor``: ``os.access`` says yes to root everywhere,
    also on file systems that take no new folders (``/proc``, a read-only mount), and the
    artifact's staging folder is created there only after the whole compile."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{final.name}.probe-", dir=ancestor))
    except OSError as exc:
        raise UsageError(f"-o {final}: slimc cannot create folders in {ancestor} "
                         f"({exc.strerror or exc}).",
                         hint="Choose a directory you can write to.") from None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(final: Path) -> None:
    """Remove staging folders of dead slimc processes next to ``final``; restore a swapped-out
    old artifact whose swap never finished."""
    name = re.escape(final.name)
    partial = re.compile(rf"^\.{name}\.(\d+)\..*\.partial$")
    old = re.compile(rf"^\.{name}\.old-(\d+)$")
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return
    for path in siblings:
        m = partial.match(path.name) or old.match(path.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if old.match(path.name) and not final.exists():
            try:
                os.replace(path, final)
                continue
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)


def explain_os_error(exc: OSError) -> UsageError | None:
    """The user-fixable OSErrors (disk full, read-only, permissions, path shape) as a
    one-paragraph UsageError; None for anything else."""
    where = exc.filename or "the output location"
    reasons = {
        errno.ENOSPC: ("the disk is full", "Free space there (or use -o on another disk)."),
        errno.EDQUOT: ("the disk quota is exceeded", "Free space or use -o elsewhere."),
        errno.EROFS: ("the file system is read-only", "Choose a writable -o directory."),
        errno.EACCES: ("permission denied", "Choose a directory you can write to."),
        errno.EPERM: ("operation not permitted", "Choose a directory you can write to."),
        errno.ENOTDIR: ("a part of the path is a file, not a directory",
                        "Choose another -o directory."),
        errno.EEXIST: ("a file of that name already exists", "Choose another -o directory."),
        errno.EISDIR: ("it is a directory", "Give a file path instead."),
        errno.ENAMETOOLONG: ("the path is too long", "Use a shorter path."),
    }
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full_error(exc, [Path(exc.filename)] if exc.filename else None)
    if exc.errno not in reasons:
        return None
    what, fix = reasons[exc.errno]
    return UsageError(f"Cannot write {where}: {what} ({exc.strerror}).", hint=fix)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def disk_full_error(exc: BaseException, places: list[Path] | None = None) -> UsageError | None:
    """If ``exc`` (or what caused it) is a full disk, as an OSError or as text from native code
    (TVM's "Compilation error: ... No space left on device" from the linker), a UsageError that
    names the fullest of ``places`` (the -o folder, the temp folder); else None."""
    import tempfile

    line = None
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            line = f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
            break
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            line = next(ln for ln in text.splitlines()
                        if "No space left" in ln or "Disk quota" in ln).strip()[:300]
            break
    if line is None:
        return None
    candidates = [Path(p) for p in (places or [])] + [Path(tempfile.gettempdir())]
    free = []
    for place in candidates:
        while not place.exists() and place != place.parent:
            place = place.parent
        try:
            free.append((shutil.disk_usage(place).free, place))
        except OSError:
            continue
    where = ""
    if free:
        space, place = min(free, key=lambda f: f[0])
        where = f" on {place} ({space // 1024} KiB free)"
    return UsageError(f"The disk is full{where}: {line}",
                      hint="Free space there, or point -o (and TMPDIR) at a disk with room.")
