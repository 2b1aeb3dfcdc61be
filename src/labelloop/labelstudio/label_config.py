"""A project's labeling config: which ``Choices`` classify which ``Image``, and how they map to
the model's classes.

Only whole-image classification is in scope: a ``Choices`` bound to an ``Image``. Other controls
(choices about a ``Text``, per-region choices, ...) are reported and left alone, so one config
can mix them with ours. Label Studio stores predictions with a wrong ``from_name``, ``to_name``
or label silently and never shows them: everything emitted is derived from this parse.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.parsers import expat

logger = logging.getLogger(__name__)

__all__ = [
    "ChoicesControl",
    "ControlBinding",
    "ControlMapping",
    "LabelConfig",
    "LabelConfigError",
    "map_controls",
    "parse_label_config",
]

_EXAMPLE = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="labels" toName="image" choice="multiple">'
    '<Choice value="cat"/><Choice value="dog"/></Choices></View>'
)


class LabelConfigError(ValueError):
    """The label config cannot be used; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class ChoicesControl:
    """A ``Choices`` tag bound to an ``Image``."""

    name: str  # from_name of its results
    to_name: str  # the Image's name
    image_key: str  # task data key the Image reads: "image" for value="$image"
    choices: tuple[str, ...]  # as results carry them: the alias when a Choice has one
    multiple: bool  # choice="multiple"; "single" and "single-radio" allow one label


@dataclass(frozen=True)
class LabelConfig:
    controls: tuple[ChoicesControl, ...]
    images: dict[str, str]  # Image name -> task data key
    warnings: tuple[str, ...] = ()  # what the parse skipped, for logs and the /setup reply


def parse_label_config(xml: str) -> LabelConfig:
    """The ``Choices`` controls bound to an ``Image`` in a Label Studio labeling config.

    Raises LabelConfigError when the config is not XML, declares a DOCTYPE, has no ``Image``
    reading task data, or no ``Choices`` bound to one.
    """
    root = _parse_xml(xml)
    warnings: list[str] = []
    images = _find_images(root, warnings)
    controls = _find_controls(root, images, warnings)
    for line in warnings:
        logger.warning("Label config: %s", line)
    return LabelConfig(controls=controls, images=images, warnings=tuple(warnings))


def _parse_xml(xml: str) -> ET.Element:
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError(
            f"the label config is empty (got {xml!r}); expected XML such as {_EXAMPLE}"
        )
    # expat feeding an ElementTree builder, with DOCTYPE refused: entities can only be declared
    # inside a DOCTYPE, so no entity-expansion ("billion laughs") or external-entity attack
    # gets through, and no Label Studio config needs one.
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.StartDoctypeDeclHandler = _refuse_doctype
    try:
        parser.Parse(xml.strip(), True)
    except expat.ExpatError as exc:
        raise LabelConfigError(
            f"the label config is not valid XML ({exc}); expected XML such as {_EXAMPLE}"
        ) from exc
    return builder.close()


def _refuse_doctype(*_: object) -> None:
    raise LabelConfigError(
        "the label config declares a DOCTYPE; DOCTYPE and ENTITY declarations are refused "
        "(they allow entity-expansion attacks) and Label Studio configs never need one: remove it"
    )


def _find_images(root: ET.Element, warnings: list[str]) -> dict[str, str]:
    """Image name -> task data key, for the Images that read task data."""
    images: dict[str, str] = {}
    for image in root.iter("Image"):
        name, value = image.get("name"), image.get("value", "")
        if not name:
            warnings.append(f"an <Image> without a name (value={value!r}) is skipped")
        elif not value.startswith("$") or len(value) < 2:
            warnings.append(
                f"<Image name={name!r}> has value={value!r}, not a task data reference such "
                'as "$image": skipped'
            )
        else:
            images[name] = value[1:]
    if not images:
        raise LabelConfigError(
            "the label config has no <Image> that reads task data "
            f"({'; '.join(warnings) or 'no <Image> tag at all'}); this backend classifies whole "
            f'images: add e.g. <Image name="image" value="$image"/>'
        )
    return images


def _find_controls(
    root: ET.Element, images: Mapping[str, str], warnings: list[str]
) -> tuple[ChoicesControl, ...]:
    tags = {el.get("name"): el.tag for el in root.iter() if el.get("name")}
    controls: dict[str, ChoicesControl] = {}
    for element in root.iter("Choices"):
        control = _choices_control(element, images, tags, warnings)
        if control is None:
            continue
        if control.name in controls:
            raise LabelConfigError(
                f"two <Choices> are named {control.name!r}; Label Studio tells controls apart "
                "by name: rename one"
            )
        controls[control.name] = control
    if not controls:
        raise LabelConfigError(
            "the label config has no <Choices> bound to an <Image> "
            f"({'; '.join(warnings) or 'no <Choices> tag at all'}); add one whose toName is an "
            f"Image's name, e.g. {_EXAMPLE}"
        )
    return tuple(controls.values())


def _choices_control(
    element: ET.Element,
    images: Mapping[str, str],
    tags: Mapping[str | None, str],
    warnings: list[str],
) -> ChoicesControl | None:
    """The control for one ``Choices`` tag, or None (with a warning) when it is not ours."""
    name = element.get("name")
    to_names = [n.strip() for n in element.get("toName", "").split(",") if n.strip()]
    if not name:
        warnings.append(f"a <Choices> without a name (toName={to_names}) is skipped")
        return None
    image_names = [n for n in to_names if n in images]
    if not image_names:
        bound = ", ".join(f"{n!r} ({tags.get(n, 'no such tag')})" for n in to_names) or "nothing"
        warnings.append(f"Choices {name!r} is bound to {bound}, not to an Image: ignored")
        return None
    if element.get("perRegion", "").lower() == "true":
        warnings.append(f"Choices {name!r} labels regions, not whole images: ignored")
        return None
    if len(image_names) > 1:
        # The reference backend also answers for the first target only.
        warnings.append(
            f"Choices {name!r} is bound to several Images {image_names}: predicting for "
            f"{image_names[0]!r} only"
        )
    choices = _choice_values(element, name, warnings)
    if not choices:
        warnings.append(
            f"Choices {name!r} has no static <Choice> (dynamic choices are not supported): ignored"
        )
        return None
    return ChoicesControl(
        name=name,
        to_name=image_names[0],
        image_key=images[image_names[0]],
        choices=choices,
        multiple=element.get("choice", "single") == "multiple",
    )


def _choice_values(element: ET.Element, control: str, warnings: list[str]) -> tuple[str, ...]:
    """The strings results carry for each Choice, in config order: alias, else value."""
    values: list[str] = []
    for choice in element.iter("Choice"):
        value = choice.get("alias") or choice.get("value")
        if not value:
            warnings.append(f"a <Choice> without a value in Choices {control!r} is skipped")
        elif value in values:
            warnings.append(f"Choices {control!r} lists {value!r} twice: kept once")
        else:
            values.append(value)
    return tuple(values)


# --------------------------------------------------------------------------- model classes


@dataclass(frozen=True)
class ControlBinding:
    control: ChoicesControl
    class_indices: tuple[int, ...]  # model class per matched choice, in the control's order
    labels: tuple[str, ...]  # the choice string emitted for each of those classes


@dataclass(frozen=True)
class ControlMapping:
    bindings: tuple[ControlBinding, ...]  # controls with at least one model class
    unmatched_choices: dict[str, list[str]]  # control name -> its choices the model lacks
    unused_classes: list[str]  # model classes no control offers: never emitted

    @property
    def n_classes(self) -> int:
        """Number of model classes: each is bound to some control or unused."""
        bound = {i for binding in self.bindings for i in binding.class_indices}
        return len(bound) + len(self.unused_classes)

    def warnings(self) -> list[str]:
        """Human-readable lines for the logs and the /setup reply."""
        bound = {binding.control.name for binding in self.bindings}
        lines = []
        for control, choices in self.unmatched_choices.items():
            if control in bound:
                lines.append(
                    f"Choices {control!r}: the model does not know {choices}; they are never "
                    "predicted until a model is trained on annotations that use them"
                )
            else:
                lines.append(
                    f"Choices {control!r} gets no predictions: the model knows none of its "
                    f"choices {choices}"
                )
        if self.unused_classes:
            lines.append(
                f"model classes {self.unused_classes} are not choices of any Choices bound to an "
                "Image: never predicted (add them as <Choice value=...> to see them)"
            )
        return lines


def map_controls(config: LabelConfig, classes: Sequence[str]) -> ControlMapping:
    """Which model classes each control offers, matching choice strings to class names.

    Exact matches first, then case-insensitive ones (a class name that differs from another only
    by case is matched exactly only). A class offered by several controls is emitted in each.
    Raises LabelConfigError when no control offers any class.
    """
    classes = [str(c) for c in classes]
    duplicates = sorted(name for name, n in Counter(classes).items() if n > 1)
    if duplicates:
        raise ValueError(f"model classes must be unique, got {duplicates} more than once")
    exact = {name: i for i, name in enumerate(classes)}
    folded_counts = Counter(name.casefold() for name in classes)
    folded = {
        name.casefold(): i for i, name in enumerate(classes) if folded_counts[name.casefold()] == 1
    }

    bindings: list[ControlBinding] = []
    unmatched: dict[str, list[str]] = {}
    for control in config.controls:
        matched = _match_choices(control.choices, exact, folded)
        missing = [c for pos, c in enumerate(control.choices) if pos not in matched]
        if missing:
            unmatched[control.name] = missing
        if matched:
            bindings.append(
                ControlBinding(
                    control=control,
                    class_indices=tuple(matched.values()),
                    labels=tuple(control.choices[pos] for pos in matched),
                )
            )
    if not bindings:
        offered = {control.name: list(control.choices) for control in config.controls}
        raise LabelConfigError(
            f"no choice of the label config matches a model class: the config offers {offered}, "
            f"the model predicts {classes}; name the choices (or their alias) after the classes, "
            "or train a model on this project's annotations"
        )
    bound = {i for binding in bindings for i in binding.class_indices}
    return ControlMapping(
        bindings=tuple(bindings),
        unmatched_choices=unmatched,
        unused_classes=[name for i, name in enumerate(classes) if i not in bound],
    )


def _match_choices(
    choices: Sequence[str], exact: Mapping[str, int], folded: Mapping[str, int]
) -> dict[int, int]:
    """Choice position -> model class index, ordered by position; each class at most once."""
    matched = {pos: exact[choice] for pos, choice in enumerate(choices) if choice in exact}
    taken = set(matched.values())
    for pos, choice in enumerate(choices):
        index = folded.get(choice.casefold())
        # An exact match elsewhere in this control wins: "Rust" must not add a second "rust".
        if pos not in matched and index is not None and index not in taken:
            matched[pos] = index
            taken.add(index)
    return dict(sorted(matched.items()))
