"""An LRU disk cache of downloaded image bytes, keyed by sha256 of the URL."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# A temp file this old in the cache directory was left by a writer that crashed.
_STALE_TEMP_S = 600.0


class DiskCache:
    """Downloaded bytes under sha256(URL), evicted least-recently-used first (by mtime)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._dir = directory
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        # Bytes in the folder, counted from one scan and then kept up to date by our own puts:
        # scanning the folder on every put made a bulk /predict quadratic (15 % of its CPU at
        # 512 tasks). Other writers sharing the folder are seen at the next scan, when the
        # count passes the cap, so the cap is soft by at most what they wrote meanwhile.
        self._total: int | None = None

    def _path(self, url: str) -> Path:
        return self._dir / hashlib.sha256(url.encode()).hexdigest()

    def get(self, url: str) -> bytes | None:
        path = self._path(url)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("image cache: cannot read %s: %s", path, exc)
            return None
        with contextlib.suppress(OSError):  # evicted meanwhile: the bytes are still good
            os.utime(path)
        return data

    def put(self, url: str, data: bytes) -> None:
        if not data or len(data) > self._max_bytes:
            return  # too big: caching it would evict everything else and then itself
        path = self._path(url)
        with self._lock:
            try:
                self._write_atomically(path, data)
            except OSError as exc:
                logger.warning("image cache: cannot write %s: %s", path, exc)
                return
            if self._total is not None:
                self._total += len(data)  # an overwrite overcounts: that only scans sooner
            if self._total is None or self._total > self._max_bytes:
                self._evict(keep=path)

    def _write_atomically(self, path: Path, data: bytes) -> None:
        # Readers in other threads or processes see either no file or the whole file.
        fd, temp = tempfile.mkstemp(dir=self._dir, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    def _entries(self) -> list[tuple[int, int, str]]:
        """(mtime_ns, size, path) of cache entries; removes stale temp files on the way."""
        entries: list[tuple[int, int, str]] = []
        now = time.time()
        with os.scandir(self._dir) as scan:
            for entry in scan:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(info.st_mode):
                    continue
                if entry.name.endswith(".tmp"):
                    if now - info.st_mtime > _STALE_TEMP_S:
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                    continue
                if _is_cache_key(entry.name):  # never delete files this cache did not write
                    entries.append((info.st_mtime_ns, info.st_size, entry.path))
        return entries

    def _evict(self, keep: Path) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self._max_bytes:
                break
            if path == str(keep):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                logger.debug("image cache: evicted %s (%d bytes)", path, size)
            total -= size
        self._total = total


def _is_cache_key(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)
