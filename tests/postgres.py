"""A real PostgreSQL 15 for the tests: a throw-away cluster with its own data folder, port (on
127.0.0.1) and socket folder, trust authentication, started and stopped by pid.

PostgreSQL refuses to run as root: when the tests run as root the cluster belongs to the
`postgres` system user and its commands run as that user (``subprocess``'s ``user=``, so the
server's pid is the child's pid: nothing in between to signal or to reap).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

from labelloop.dev.launcher import free_port

__all__ = ["PG_BIN", "PostgresServer", "postgres_available"]

PG_BIN = Path(os.environ.get("LABELLOOP_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
_SYSTEM_USER = "postgres"
_SUPERUSER = "postgres"  # the cluster's superuser (initdb -U), trusted without a password
_LOG_TAIL_CHARS = 4000


def postgres_available(bin_dir: Path = PG_BIN) -> bool:
    return (bin_dir / "postgres").is_file() and (bin_dir / "initdb").is_file()


class PostgresServer:
    """``with PostgresServer() as server: ... server.url("db")``. ``stop`` and ``start`` (or
    ``restart``) keep the data and the port: a restart as a client sees one."""

    def __init__(self, *, bin_dir: Path = PG_BIN, start_timeout_s: float = 60.0) -> None:
        self.bin_dir = bin_dir
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="labelloop-pg-"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log_path = self.root / "postgres.log"
        self._process: subprocess.Popen[bytes] | None = None
        as_root = os.geteuid() == 0
        # The temporary folder is root's and private: the server's user must own it.
        self._user = _SYSTEM_USER if as_root else None
        if as_root:
            shutil.chown(self.root, _SYSTEM_USER, _SYSTEM_USER)
        self.socket_dir.mkdir()
        if as_root:
            shutil.chown(self.socket_dir, _SYSTEM_USER, _SYSTEM_USER)

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (making the cluster on first use) and wait until it accepts
        connections; stops it again if it does not."""
        if self.running:
            return
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    str(self.socket_dir),
                    # A test cluster: losing it on a power cut is fine, waiting for the disk is
                    # not. A clean shutdown still writes everything (what restart() relies on).
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=32MB",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                **self._as_user(),
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fast shutdown (SIGINT: clients are disconnected, open transactions rolled back), by
        the server's pid; SIGKILL when it does not end in time. Does nothing when stopped."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its data."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- databases ----------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        """Drop it, disconnecting whoever is still connected."""
        with self._admin() as conn:
            statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(statement.format(sql.Identifier(name)))

    # -- plumbing -----------------------------------------------------------------------------

    def _admin(self) -> psycopg.Connection:
        # CREATE / DROP DATABASE cannot run inside a transaction.
        return psycopg.connect(self._conninfo(), autocommit=True, connect_timeout=5)

    def _conninfo(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={_SUPERUSER} dbname={database}"

    def _as_user(self) -> dict[str, object]:
        if self._user is None:
            return {}
        return {"user": self._user, "group": self._user, "extra_groups": []}

    def _initdb(self) -> None:
        result = subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                _SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=self.root,
            timeout=self.start_timeout_s,
            **self._as_user(),
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RuntimeError(f"initdb failed (exit {result.returncode}):\n{output}")

    def _wait_ready(self) -> None:
        """Poll with a connection until the server answers, or fail with its log."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise RuntimeError(f"PostgreSQL exited (code {code}) on start:\n{self._log_tail()}")
            try:
                with psycopg.connect(self._conninfo(), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"PostgreSQL on port {self.port} did not accept connections within "
                        f"{self.start_timeout_s} s ({exc}):\n{self._log_tail()}"
                    ) from exc
            time.sleep(0.05)  # the polling interval, not a synchronisation

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        except OSError:
            return "(no log)"
