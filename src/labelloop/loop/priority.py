"""Run CPU-heavy training at a lower priority than request handling, in a thread made for it."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def lower_thread_priority(increment: int) -> bool:
    """Raise the calling thread's nice value by `increment`; False where that is not possible.

    Linux schedules threads individually, and threads created afterwards by this one (torch's
    OpenMP team) inherit the value. Raising nice needs no privilege; lowering it back does, so
    only ever call this from a thread made for the purpose.
    """
    if increment <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(
            os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment)
        )
    except OSError as exc:
        logger.debug("Cannot lower the training thread's priority: %s", exc)
        return False
    return True


def run_at_lower_priority(increment: int, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """`fn(*args, **kwargs)` in a fresh thread niced by `increment`; its result or exception.

    A fresh thread, not the trainer's own: whatever the trainer thread creates later (the ONNX
    Runtime session of a promoted model, whose worker threads serve /predict) must keep normal
    priority, and a thread cannot take its priority back.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        lower_thread_priority(increment)
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="trainer-fit", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
