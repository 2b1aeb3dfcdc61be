"""A real nginx on 127.0.0.1 balancing serving replicas, for the distributed-mode tests
(Debian's nginx, installed on first use). Started and stopped by the tests, by pid."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
from debian import ensure_packages
from helpers import wait_until

from labelloop.dev.launcher import free_port

__all__ = ["NginxBalancer", "nginx_config"]


def nginx_config(port: int, upstreams: list[str], workdir: Path) -> str:
    """Round robin over the replicas; a replica that refuses, resets or answers 502/503/504
    is skipped and the request retried on the next one (POSTs too: /predict and the webhooks
    are idempotent), which is what makes killing one replica invisible to Label Studio."""
    servers = "\n".join(
        f"        server {upstream} max_fails=1 fail_timeout=10s;" for upstream in upstreams
    )
    return f"""
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    client_max_body_size 256m;
    upstream labelloop {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://labelloop;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 2s;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


class NginxBalancer:
    def __init__(self, upstreams: list[str], workdir: Path | None = None) -> None:
        ensure_packages(
            ["nginx"],
            lambda: shutil.which("nginx") is not None or Path("/usr/sbin/nginx").is_file(),
            "the load-balancer tests",
        )
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="labelloop-nginx-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # nginx's workers run as nobody and write their temp files here
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = self.dir / "nginx.conf"
        conf.write_text(nginx_config(self.port, upstreams, self.dir))
        self.process = subprocess.Popen(
            [self.binary, "-p", str(self.dir), "-c", str(conf), "-g", "daemon off;"],
            stdout=(self.dir / "stdout.log").open("ab"),
            stderr=subprocess.STDOUT,
        )

        def answers() -> bool:
            assert self.process.poll() is None, (self.dir / "error.log").read_text()
            try:
                httpx.get(f"{self.url}/health", timeout=2)
                return True
            except httpx.HTTPError:
                return False

        wait_until(answers, timeout_s=20, what="nginx to accept connections")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
