"""The compile cache: an unchanged recompile copies the artifact instead of rebuilding it.

Content-addressed: the key is the hash of everything the artifact depends on
(:mod:`slimc.provenance`: model files, pipeline, target, calibration data, options, versions,
slimc's own source). Each entry also lists the other files the compile was seen to read, with
their hashes, and is used only while they are unchanged (ccache's "manifest" idea).

* Folder: ``$SLIMC_CACHE_DIR/compile``, else the platform's user cache dir
  (``~/.cache/slimc/compile`` on Linux, via platformdirs).
* Concurrency: one file lock per key, so two identical compiles run once and the second copies
  the first's result; entries appear with an atomic rename, so readers never see half of one.
* Off: ``--no-cache``, ``CompileOptions(cache=False)`` or ``SLIMC_CACHE=0``; also bypassed
  when tuning, for in-memory models and when a custom plugin registry is passed.
* Size: ``SLIMC_CACHE_MAX_MB`` (default 4096); least recently used entries are evicted after a
  store, skipping any entry another process holds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from slimc.provenance import sha256_file

DEFAULT_MAX_MB = 4096
ARTIFACT = "artifact"
READS = "reads.json"
WARNINGS = "warnings.json"


def cache_root() -> Path:
    """``$SLIMC_CACHE_DIR`` or the platform's user cache folder for slimc."""
    env = os.environ.get("SLIMC_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return platformdirs.user_cache_path("slimc")


@dataclass
class CacheHit:
    artifact: Path
    reads: list[Path]
    #: The warnings the cold compile printed, replayed on a hit.
    warnings: list[str]


class CompileCache:
    def __init__(self, root: Path | None = None, max_bytes: int | None = None) -> None:
        self.root = (root or cache_root()) / "compile"
        if max_bytes is None:
            max_bytes = int(float(os.environ.get("SLIMC_CACHE_MAX_MB", DEFAULT_MAX_MB)) * 2**20)
        self.max_bytes = max_bytes

    def _entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lock(self, key: str) -> FileLock:
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / "locks" / f"{key}.lock"))

    def lookup(self, key: str) -> CacheHit | None:
        """The entry for ``key`` if it exists and every file it read is unchanged."""
        entry = self._entry(key)
        try:
            reads = json.loads((entry / READS).read_text())
        except (OSError, ValueError):
            return None
        for path, digest in reads.items():
            try:
                if sha256_file(Path(path)) != digest:
                    return None
            except OSError:
                return None
        now = time.time()
        os.utime(entry, (now, now))  # last use, for LRU eviction
        try:
            warnings = json.loads((entry / WARNINGS).read_text())
        except (OSError, ValueError):
            warnings = []
        return CacheHit(entry / ARTIFACT, [Path(p) for p in reads], warnings)

    def store(self, key: str, artifact_dir: Path, reads: dict[str, str],
              warnings: list[str] = ()) -> None:
        """Copy ``artifact_dir`` in as the entry for ``key`` (caller holds ``lock(key)``)."""
        entry = self._entry(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".store-", dir=entry.parent))
        try:
            shutil.copytree(artifact_dir, scratch / ARTIFACT)
            (scratch / READS).write_text(json.dumps(reads, indent=1, sort_keys=True))
            (scratch / WARNINGS).write_text(json.dumps(list(warnings)))
            if entry.exists():
                shutil.rmtree(entry)
            os.replace(scratch, entry)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.evict(keep=key)

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, key) for every entry."""
        rows = []
        for entry in self.root.glob("??/*"):
            if entry.name.startswith("."):
                continue
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            rows.append((entry.stat().st_mtime, size, entry.name))
        return rows

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used entries until the cache fits ``max_bytes``."""
        rows = sorted(self.entries())
        total = sum(size for _, size, _ in rows)
        removed = []
        for _, size, key in rows:
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            lock = self.lock(key)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # another compile is using it
            try:
                shutil.rmtree(self._entry(key), ignore_errors=True)
            finally:
                lock.release()
            total -= size
            removed.append(key)
        return removed
