"""Debian packages the suite needs (Chromium, Redis, nginx), installed on first use as the
suite installs Label Studio: a clean machine needs nothing but Python to run the tests."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

__all__ = ["ensure_packages"]

INSTALL_TIMEOUT_S = 900


def ensure_packages(packages: Sequence[str], installed: Callable[[], bool], purpose: str) -> None:
    """Install `packages` with apt-get unless `installed()`; RuntimeError saying what to do
    when apt-get cannot."""
    if installed():
        return
    names = " and ".join(packages)
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError(
            f"{purpose} need {names} (Debian packages), and there is no apt-get here to "
            "install them: install them or their equivalents"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Wait for a dpkg lock another install holds rather than fail at once.
    install = [apt, "-o", "DPkg::Lock::Timeout=600", "install", "-y", *packages]
    log.info("installing %s with apt-get (about a minute)", names)
    done = subprocess.run(
        install, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
    )
    if done.returncode != 0:
        # A fresh container has no package lists yet.
        subprocess.run(
            [apt, "-o", "DPkg::Lock::Timeout=600", "update"],
            env=env,
            capture_output=True,
            timeout=INSTALL_TIMEOUT_S,
        )
        done = subprocess.run(
            install, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
        )
    if done.returncode != 0 or not installed():
        raise RuntimeError(
            f"`apt-get install -y {' '.join(packages)}` failed (exit {done.returncode}; as "
            f"root? with network?):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
