"""A real Redis server on 127.0.0.1 for the distributed-mode tests (Debian's redis-server,
installed on first use). Started and stopped by the tests, by pid."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis
from debian import ensure_packages
from helpers import wait_until

from labelloop.dev.launcher import free_port

__all__ = ["RedisServer"]


class RedisServer:
    def __init__(self, workdir: Path | None = None) -> None:
        ensure_packages(
            ["redis-server"], lambda: shutil.which("redis-server") is not None, "the queue tests"
        )
        self.binary = str(shutil.which("redis-server"))
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="labelloop-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # No persistence: a restart loses every queued job, the worst case the product must
        # survive (jobs are re-derived from the ledger).
        log = (self.dir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def answers() -> bool:
            assert self.process is not None and self.process.poll() is None, "redis exited"
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, timeout_s=20, what="redis-server to answer PING")
        client.close()

    def stop(self) -> None:
        """kill -9: whatever was queued is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
