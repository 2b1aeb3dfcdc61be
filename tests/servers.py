"""Real HTTP servers on 127.0.0.1 for tests: uvicorn in a background thread."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
from helpers import wait_until

from labelloop.dev.launcher import free_port
from labelloop.dev.threaded import serve_in_thread

__all__ = ["BackendProcess", "free_port", "serve_in_thread", "wait_until"]


class BackendProcess:
    """`labelloop serve` as a real process, for Label Studio to call."""

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        *,
        env: dict[str, str],
        basic_auth: tuple[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_dir = model_dir
        self.log_path = log_path
        self.auth = basic_auth
        self.env = env
        self.args = args
        self._start()

    def _start(self) -> None:
        full_env = dict(os.environ, **self.env)
        if self.auth:
            full_env.update(BASIC_AUTH_USER=self.auth[0], BASIC_AUTH_PASS=self.auth[1])
        self._log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "labelloop",
                "serve",
                "--model-dir",
                str(self.model_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *self.args,
            ],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def restart(self) -> None:
        """Stop and start again on the same port, model folder and settings."""
        self.stop()
        self._start()

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", auth=self.auth, timeout=5).json()

    def get(self, path: str) -> dict:
        return httpx.get(f"{self.url}{path}", auth=self.auth, timeout=10).json()

    def _wait_ready(self, timeout_s: float = 90.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"backend exited: {self.log_path.read_text()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/health", auth=self.auth, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(
                ready, timeout_s=timeout_s, what=f"the backend on {self.url}", interval_s=0.3
            )
        except AssertionError:
            self.stop()
            raise RuntimeError(
                f"backend did not become ready: {self.log_path.read_text()[-3000:]}"
            ) from None

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, exactly like a crash or the OOM killer."""
        self.process.kill()
        self.process.wait(timeout=10)
        self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log.close()
