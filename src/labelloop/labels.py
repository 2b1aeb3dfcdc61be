"""The label space: ordered classes, grouped by label column (Label Studio control)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelSpace:
    """Classes in a fixed order (the model's output order), grouped by label column.

    Class names are unique across groups: the model has one flat head, and a name that meant two
    things in two groups could not be told apart in `classes.json`.
    """

    groups: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for group, names in self.groups:
            for name in names:
                if name in seen:
                    raise ValueError(
                        f"class {name!r} appears in both {seen[name]!r} and {group!r}; "
                        "class names must be unique across label columns"
                    )
                seen[name] = group

    @classmethod
    def from_mapping(cls, groups: Mapping[str, Sequence[str]]) -> LabelSpace:
        return cls(tuple((group, tuple(names)) for group, names in groups.items()))

    @property
    def classes(self) -> list[str]:
        return [name for _, names in self.groups for name in names]

    @property
    def group_names(self) -> list[str]:
        return [group for group, _ in self.groups]

    def as_dict(self) -> dict[str, list[str]]:
        return {group: list(names) for group, names in self.groups}

    def __len__(self) -> int:
        return sum(len(names) for _, names in self.groups)

    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def group_of(self) -> dict[str, str]:
        return {name: group for group, names in self.groups for name in names}

    def binarize(self, label_sets: Iterable[Iterable[str]]) -> np.ndarray:
        """Multi-hot matrix (n, n_classes) of float32; unknown names raise KeyError."""
        index = self.index()
        rows = list(label_sets)
        matrix = np.zeros((len(rows), len(index)), dtype=np.float32)
        for r, labels in enumerate(rows):
            for name in labels:
                matrix[r, index[name]] = 1.0
        return matrix

    def decode(self, row: Sequence[bool] | np.ndarray) -> list[str]:
        return [name for name, on in zip(self.classes, row, strict=True) if on]

    def extended(self, additions: Mapping[str, Sequence[str]]) -> LabelSpace:
        """A new space with extra classes appended at the end of their groups' order.

        Existing indices within the flat order may move when a group that is not last grows, so
        callers that keep weights must map them by name, not by position.
        """
        merged = self.as_dict()
        for group, names in additions.items():
            current = merged.setdefault(group, [])
            current.extend(n for n in names if n not in current)
        return LabelSpace.from_mapping(merged)
