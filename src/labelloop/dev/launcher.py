"""Run a real Label Studio locally: for the end-to-end tests and the demo.

Label Studio pins many packages, so it lives in its own virtualenv
(:func:`ensure_label_studio`). :class:`LabelStudioServer` starts it bound to 127.0.0.1 only,
offline (no version check, analytics or Sentry), with a known admin user and a legacy API
token, local-file serving under a document root, and the SSRF / local-IP guards that would
refuse an ML backend on localhost turned off (see docs/serving.md, *Connecting to a Label
Studio on the same machine*).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

__all__ = [
    "DEFAULT_TOKEN",
    "LABEL_STUDIO_VERSION",
    "LabelStudioServer",
    "LabelStudioSettings",
    "ensure_label_studio",
    "free_port",
    "label_studio_env",
]

log = logging.getLogger(__name__)

LABEL_STUDIO_VERSION = "1.23.2"

#: Fixed legacy API token for tests and the demo (40 hex chars, like Django REST tokens).
DEFAULT_TOKEN = "1abe11009de0c0ffee5eed5ca1ab1e0123456789"

_STAMP_NAME = ".labelloop-label-studio-version"
_PIP_TAIL_LINES = 60


# --------------------------------------------------------------------------- install


def _stamp_ok(venv_dir: Path, executable: Path) -> bool:
    stamp = venv_dir / _STAMP_NAME
    if not executable.exists() or not stamp.exists():
        return False
    return stamp.read_text().strip() == LABEL_STUDIO_VERSION


def _run_logged(cmd: list[str], what: str) -> None:
    """Run ``cmd``; on failure raise RuntimeError with the tail of its output."""
    log.info("%s: %s", what, " ".join(cmd))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    tail: deque[str] = deque(maxlen=_PIP_TAIL_LINES)
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip("\n"))
        log.debug("%s", line.rstrip("\n"))
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(
            f"{what} failed (exit {rc}): {' '.join(cmd)}\n--- last output ---\n" + "\n".join(tail)
        )


def ensure_label_studio(venv_dir: Path, *, python: str = sys.executable) -> Path:
    """Make sure ``label-studio==LABEL_STUDIO_VERSION`` is installed in its own venv.

    Creates ``venv_dir`` with ``python -m venv`` and pip-installs Label Studio when the
    executable or the version stamp (written only after a successful install) is missing.
    A file lock next to the venv keeps concurrent processes from installing at once.
    Returns the path of the ``label-studio`` executable.
    """
    venv_dir = Path(venv_dir).absolute()
    executable = venv_dir / "bin" / "label-studio"
    if _stamp_ok(venv_dir, executable):
        return executable

    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = venv_dir.parent / ".label-studio-install.lock"
    with open(lock_path, "w") as lock:
        log.info("waiting for the Label Studio install lock %s", lock_path)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _stamp_ok(venv_dir, executable):  # another process installed it meanwhile
                return executable
            start = time.monotonic()
            venv_python = venv_dir / "bin" / "python"
            if not venv_python.exists():
                log.info("creating a virtualenv for Label Studio at %s", venv_dir)
                _run_logged([python, "-m", "venv", str(venv_dir)], "creating the virtualenv")
            log.info(
                "installing label-studio==%s into %s (about 1.5 min, ~1 GB)",
                LABEL_STUDIO_VERSION,
                venv_dir,
            )
            _run_logged(
                [
                    str(venv_python),
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                    f"label-studio=={LABEL_STUDIO_VERSION}",
                ],
                "pip install label-studio",
            )
            if not executable.exists():
                raise RuntimeError(f"pip install succeeded but {executable} does not exist")
            (venv_dir / _STAMP_NAME).write_text(LABEL_STUDIO_VERSION + "\n")
            log.info("installed Label Studio in %.0f s", time.monotonic() - start)
            return executable
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- server


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class LabelStudioSettings:
    data_dir: Path  # LABEL_STUDIO_BASE_DATA_DIR: SQLite database, uploads
    document_root: Path  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    port: int = 8080
    username: str = "admin@example.com"
    password: str = "labelloop-demo"
    token: str = DEFAULT_TOKEN

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def label_studio_env(
    settings: LabelStudioSettings, base: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment Label Studio runs with: offline, loopback, local files, legacy tokens."""
    env = dict(os.environ if base is None else base)
    # Don't leak our own venv into Label Studio's interpreter.
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "DJANGO_SETTINGS_MODULE"):
        env.pop(key, None)
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(Path(settings.data_dir).resolve()),
            "LABEL_STUDIO_HOST": settings.url,
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            # Since 1.23.1 both default to true and refuse an ML backend on localhost /
            # private IPs (and silently drop the webhook to it).
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            # Resolved, as LabelStudioClient.add_local_storage resolves the storage path.
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(Path(settings.document_root).resolve()),
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


class LabelStudioServer:
    """A Label Studio process on 127.0.0.1; use as a context manager."""

    def __init__(
        self,
        executable: Path,
        settings: LabelStudioSettings,
        *,
        log_file: Path | None = None,
        start_timeout_s: float = 240,
    ) -> None:
        self.executable = Path(executable)
        self.settings = settings
        self.log_file = (
            Path(log_file)
            if log_file is not None
            else (Path(settings.data_dir) / "label-studio.log")
        )
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self.boot_seconds: float | None = None

    @property
    def url(self) -> str:
        return self.settings.url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        s = self.settings
        return [
            str(self.executable),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(s.port),
            "--host",
            s.url,
            "--username",
            s.username,
            "--password",
            s.password,
            "--user-token",
            s.token,
            "--enable-legacy-api-token",
        ]

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                return "".join(deque(f, maxlen=n))
        except OSError:
            return "(no log)"

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"Label Studio is already running (pid {self._proc.pid})")
        s = self.settings
        Path(s.data_dir).mkdir(parents=True, exist_ok=True)
        Path(s.document_root).mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting Label Studio on %s (log: %s)", s.url, self.log_file)
        started = time.monotonic()
        with open(self.log_file, "ab") as logf:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=label_studio_env(s),
                cwd=str(s.data_dir),
                start_new_session=True,
            )
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - started
        log.info("Label Studio is up on %s after %.1f s", s.url, self.boot_seconds)

    def _wait_healthy(self, started: float) -> None:
        assert self._proc is not None
        deadline = started + self.start_timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while True:
                rc = self._proc.poll()
                if rc is not None:
                    raise RuntimeError(
                        f"Label Studio exited with code {rc} during start-up; "
                        f"last log lines ({self.log_file}):\n{self.log_tail()}"
                    )
                try:
                    if http.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Label Studio did not answer {self.url}/health within "
                        f"{self.start_timeout_s:.0f} s; last log lines ({self.log_file}):\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.5)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            log.info("stopping Label Studio (pid %d)", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log.warning("Label Studio ignored SIGTERM for 20 s: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Children left in the group (e.g. a worker) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> LabelStudioServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
