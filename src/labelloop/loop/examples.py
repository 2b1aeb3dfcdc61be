"""The project's annotations as the model sees them: its label space (the model's classes plus
what the config and the annotations add) and the 0/1 target matrix of a list of examples. The
fast and full updates and the label review all read annotations through these two."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from labelloop.labels import LabelSpace
from labelloop.labelstudio.label_config import ChoicesControl
from labelloop.loop.ledger import TrainingExample

__all__ = ["label_space_for", "targets_of"]


def targets_of(
    space: LabelSpace, examples: Sequence[TrainingExample], controls: Sequence[str]
) -> np.ndarray:
    known = space.index()
    return space.binarize(
        [name for control in controls for name in e.labels.get(control, ()) if name in known]
        for e in examples
    )


def label_space_for(
    base: LabelSpace,
    controls: Sequence[ChoicesControl],
    examples: Sequence[TrainingExample],
) -> LabelSpace:
    """The model's classes plus any new choice of the config or label of the annotations.

    A new name joins the group named like its control when there is one, else the group that
    already holds most of that control's classes, else a new group named after the control.
    """
    known = set(base.classes)
    group_of = base.group_of()
    additions: dict[str, list[str]] = {}
    for control in controls:
        seen = list(control.choices)
        for example in examples:
            seen.extend(n for n in example.labels.get(control.name, ()) if n not in seen)
        new = [n for n in seen if n not in known]
        if not new:
            continue
        if control.name in base.group_names:
            group = control.name
        else:
            owners = [group_of[c] for c in control.choices if c in group_of]
            group = max(set(owners), key=owners.count) if owners else control.name
        bucket = additions.setdefault(group, [])
        bucket.extend(n for n in new if n not in bucket)
        known.update(new)
    return base.extended(additions) if additions else base
