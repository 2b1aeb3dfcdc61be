"""Webhook events -> the ledger (and a nudge to the trainer). Must return in milliseconds."""

from __future__ import annotations

import logging
from typing import Any

from labelloop.labelstudio.annotations import deleted_ids_from_event, records_from_event
from labelloop.labelstudio.protocol import WebhookEvent
from labelloop.loop.jobs import JobKind
from labelloop.loop.ledger import AnnotationLedger
from labelloop.loop.trainer import Trainer

logger = logging.getLogger(__name__)

ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})


def _project_config(event: WebhookEvent) -> str | None:
    project = event.project if isinstance(event.project, dict) else None
    config = project.get("label_config") if project else None
    return config if isinstance(config, str) and config.strip() else None


def record_event(
    event: WebhookEvent, ledger: AnnotationLedger, trainer: Trainer | None
) -> dict[str, Any]:
    """Apply one event; returns what to add to the acknowledgement. Unknown actions are ignored."""
    project_id = event.project_id()
    config = _project_config(event)
    config_changed = (
        ledger.set_label_config(project_id, config) if project_id is not None and config else False
    )
    action = event.action
    if action in ANNOTATION_ACTIONS:
        records = records_from_event(event)
        changed = ledger.upsert(records)
        if trainer is not None:
            trainer.notify_change()
        return {"recorded": len(records), "changed": changed}
    if action == "ANNOTATIONS_DELETED":
        removed = ledger.delete(deleted_ids_from_event(event), project_id=project_id)
        if trainer is not None:
            trainer.notify_change()
        return {"deleted": removed}
    if action == "START_TRAINING":
        if project_id is None or trainer is None:
            return {"queued": []}
        # Fast first (a better model in seconds), then the full fine-tune.
        jobs = trainer.request(project_id, [JobKind.FAST, JobKind.FULL], "start_training")
        return {"queued": [job.id for job in jobs]}
    if action == "PROJECT_UPDATED":
        if config_changed and trainer is not None and project_id is not None:
            # New choices extend the head; a fast update adds them without losing the rest.
            trainer.request(project_id, [JobKind.FAST], "label_config_changed")
        return {"label_config_changed": config_changed}
    return {"ignored": True}
