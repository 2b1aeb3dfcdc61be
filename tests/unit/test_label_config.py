"""Parsing labeling configs and matching their choices to model classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labelloop.dev.demo import LABEL_GROUPS, render_label_config
from labelloop.labelstudio.label_config import (
    ChoicesControl,
    LabelConfig,
    LabelConfigError,
    map_controls,
    parse_label_config,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "label-studio-1.23.2"
FIXTURE_CONFIG: str = json.loads((FIXTURES / "setup.json").read_text(encoding="utf-8"))["schema"]

THREE_CONTROLS = """
<View>
  <Image name="photo" value="$img"/>
  <Choices name="component" toName="photo" choice="multiple">
    <Choice value="bolt"/><Choice value="nut"/>
  </Choices>
  <Choices name="defect" toName="photo" choice="multiple">
    <Choice value="scratch"/><Choice value="crack"/>
  </Choices>
  <Choices name="quality" toName="photo">
    <Choice value="good"/><Choice value="bad"/>
  </Choices>
</View>
"""


def test_fixture_config() -> None:
    config = parse_label_config(FIXTURE_CONFIG)
    assert config == LabelConfig(
        controls=(
            ChoicesControl("component", "image", "image", ("bolt", "nut", "gear"), True),
            ChoicesControl("defect", "image", "image", ("scratch", "crack", "rust"), True),
        ),
        images={"image": "image"},
    )


def test_three_controls_and_single_choice() -> None:
    config = parse_label_config(THREE_CONTROLS)
    assert [c.name for c in config.controls] == ["component", "defect", "quality"]
    assert [c.multiple for c in config.controls] == [True, True, False]
    assert {c.to_name for c in config.controls} == {"photo"}
    assert {c.image_key for c in config.controls} == {"img"}
    assert config.images == {"photo": "img"}
    assert config.warnings == ()


@pytest.mark.parametrize(("attribute", "multiple"), [("single", False), ("single-radio", False)])
def test_single_choice_variants(attribute: str, multiple: bool) -> None:
    config = parse_label_config(
        f'<View><Image name="i" value="$i"/><Choices name="c" toName="i" choice="{attribute}">'
        '<Choice value="a"/></Choices></View>'
    )
    assert config.controls[0].multiple is multiple


def test_demo_config_parses() -> None:
    config = parse_label_config(render_label_config(LABEL_GROUPS))
    assert {c.name: c.choices for c in config.controls} == dict(LABEL_GROUPS)


def test_nested_views() -> None:
    config = parse_label_config(
        """
        <View>
          <View style="display: flex">
            <View><Image name="image" value="$image"/></View>
            <View>
              <Header value="Parts"/>
              <View><Choices name="parts" toName="image" choice="multiple">
                <View><Choice value="bolt"/></View><Choice value="nut"/>
              </Choices></View>
            </View>
          </View>
        </View>
        """
    )
    (control,) = config.controls
    assert (control.name, control.to_name, control.choices) == ("parts", "image", ("bolt", "nut"))


def test_choices_bound_to_text_are_ignored() -> None:
    config = parse_label_config(
        """
        <View>
          <Text name="caption" value="$caption"/>
          <Choices name="sentiment" toName="caption"><Choice value="positive"/></Choices>
          <Image name="image" value="$image"/>
          <Choices name="parts" toName="image" choice="multiple"><Choice value="bolt"/></Choices>
        </View>
        """
    )
    assert [c.name for c in config.controls] == ["parts"]
    assert any("sentiment" in w and "Text" in w for w in config.warnings)


def test_to_name_listing_several_tags_takes_the_image() -> None:
    config = parse_label_config(
        '<View><Text name="t" value="$t"/><Image name="img" value="$url"/>'
        '<Choices name="c" toName="t, img"><Choice value="a"/></Choices></View>'
    )
    assert (config.controls[0].to_name, config.controls[0].image_key) == ("img", "url")


def test_tag_names_are_case_sensitive() -> None:
    with pytest.raises(LabelConfigError, match="no <Image>"):
        parse_label_config(
            '<View><image name="i" value="$i"/>'
            '<Choices name="c" toName="i"><Choice value="a"/></Choices></View>'
        )


def test_image_without_data_reference_is_skipped() -> None:
    config = parse_label_config(
        '<View><Image name="static" value="http://x/y.png"/><Image name="i" value="$i"/>'
        '<Choices name="c" toName="i"><Choice value="a"/></Choices></View>'
    )
    assert config.images == {"i": "i"}
    assert any("static" in w for w in config.warnings)


def test_choices_only_on_a_static_image_is_an_error() -> None:
    with pytest.raises(LabelConfigError, match="no <Image> that reads task data.*static"):
        parse_label_config(
            '<View><Image name="static" value="http://x/y.png"/>'
            '<Choices name="c" toName="static"><Choice value="a"/></Choices></View>'
        )


def test_alias_is_what_results_carry() -> None:
    config = parse_label_config(
        '<View><Image name="i" value="$i"/><Choices name="c" toName="i" choice="multiple">'
        '<Choice value="Scratch on the surface" alias="scratch"/><Choice value="rust"/>'
        "</Choices></View>"
    )
    assert config.controls[0].choices == ("scratch", "rust")
    mapping = map_controls(config, ["rust", "scratch"])
    assert mapping.bindings[0].labels == ("scratch", "rust")
    assert mapping.bindings[0].class_indices == (1, 0)


def test_duplicate_choice_kept_once() -> None:
    config = parse_label_config(
        '<View><Image name="i" value="$i"/><Choices name="c" toName="i">'
        '<Choice value="a"/><Choice value="a"/></Choices></View>'
    )
    assert config.controls[0].choices == ("a",)
    assert any("twice" in w for w in config.warnings)


def test_duplicate_control_names_refused() -> None:
    with pytest.raises(LabelConfigError, match="two <Choices> are named 'c'"):
        parse_label_config(
            '<View><Image name="i" value="$i"/>'
            '<Choices name="c" toName="i"><Choice value="a"/></Choices>'
            '<Choices name="c" toName="i"><Choice value="b"/></Choices></View>'
        )


def test_per_region_and_dynamic_choices_ignored() -> None:
    with pytest.raises(LabelConfigError, match="no <Choices> bound to an <Image>") as error:
        parse_label_config(
            '<View><Image name="i" value="$i"/>'
            '<Choices name="region" toName="i" perRegion="true"><Choice value="a"/></Choices>'
            '<Choices name="dynamic" toName="i" value="$options"/></View>'
        )
    assert "regions" in str(error.value) and "dynamic" in str(error.value)


def test_no_image() -> None:
    with pytest.raises(LabelConfigError, match="no <Image>.*add e.g."):
        parse_label_config(
            '<View><Text name="t" value="$t"/>'
            '<Choices name="c" toName="t"><Choice value="a"/></Choices></View>'
        )


def test_no_choices_bound_to_an_image() -> None:
    with pytest.raises(LabelConfigError, match="no <Choices> bound to an <Image>.*'c' is bound"):
        parse_label_config(
            '<View><Image name="i" value="$i"/><Text name="t" value="$t"/>'
            '<Choices name="c" toName="t"><Choice value="a"/></Choices></View>'
        )


@pytest.mark.parametrize("xml", ["<View><Image name='i'", "not xml", "<View>&undefined;</View>"])
def test_not_xml(xml: str) -> None:
    with pytest.raises(LabelConfigError, match="not valid XML \\(.*line 1"):
        parse_label_config(xml)


@pytest.mark.parametrize("xml", ["", "   "])
def test_empty(xml: str) -> None:
    with pytest.raises(LabelConfigError, match="empty"):
        parse_label_config(xml)


@pytest.mark.parametrize(
    "xml",
    [
        # Billion laughs: would expand to gigabytes if entities were honoured.
        '<?xml version="1.0"?><!DOCTYPE View [<!ENTITY a "aaaaaaaaaa">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
        '<View><Image name="i" value="$i"/><Choices name="c" toName="i">'
        '<Choice value="&c;"/></Choices></View>',
        # External entity: would read a local file.
        '<!DOCTYPE View [<!ENTITY x SYSTEM "file:///etc/passwd">]><View>&x;</View>',
        '<!DOCTYPE View><View><Image name="i" value="$i"/></View>',
    ],
)
def test_doctype_and_entities_refused(xml: str) -> None:
    with pytest.raises(LabelConfigError, match="DOCTYPE"):
        parse_label_config(xml)


# --------------------------------------------------------------------------- map_controls


def test_map_fixture_config_to_model_classes() -> None:
    config = parse_label_config(FIXTURE_CONFIG)
    classes = ["scratch", "bolt", "rust", "nut", "gear", "crack"]
    mapping = map_controls(config, classes)
    component, defect = mapping.bindings
    assert (component.control.name, component.class_indices, component.labels) == (
        "component",
        (1, 3, 4),
        ("bolt", "nut", "gear"),
    )
    assert (defect.control.name, defect.class_indices, defect.labels) == (
        "defect",
        (0, 5, 2),
        ("scratch", "crack", "rust"),
    )
    assert mapping.unmatched_choices == {}
    assert mapping.unused_classes == []
    assert mapping.n_classes == 6
    assert mapping.warnings() == []


def test_unknown_labels_both_ways() -> None:
    config = parse_label_config(THREE_CONTROLS)
    mapping = map_controls(config, ["bolt", "washer", "scratch", "crack", "dent"])
    assert [b.control.name for b in mapping.bindings] == ["component", "defect"]
    assert mapping.unmatched_choices == {"component": ["nut"], "quality": ["good", "bad"]}
    assert mapping.unused_classes == ["washer", "dent"]
    assert mapping.n_classes == 5
    warnings = "\n".join(mapping.warnings())
    assert "'component': the model does not know ['nut']" in warnings
    assert "'quality' gets no predictions" in warnings
    assert "['washer', 'dent']" in warnings


def test_case_insensitive_match_emits_the_config_spelling() -> None:
    config = parse_label_config(
        '<View><Image name="i" value="$i"/><Choices name="c" toName="i" choice="multiple">'
        '<Choice value="Bolt"/><Choice value="NUT"/><Choice value="gear"/></Choices></View>'
    )
    mapping = map_controls(config, ["nut", "bolt", "gear"])
    assert mapping.bindings[0].class_indices == (1, 0, 2)
    assert mapping.bindings[0].labels == ("Bolt", "NUT", "gear")


def test_exact_match_wins_over_case_insensitive() -> None:
    config = parse_label_config(
        '<View><Image name="i" value="$i"/><Choices name="c" toName="i" choice="multiple">'
        '<Choice value="Rust"/><Choice value="rust"/></Choices></View>'
    )
    mapping = map_controls(config, ["rust"])
    assert mapping.bindings[0].labels == ("rust",)
    assert mapping.unmatched_choices == {"c": ["Rust"]}


def test_classes_differing_only_by_case_match_exactly_only() -> None:
    config = parse_label_config(
        '<View><Image name="i" value="$i"/><Choices name="c" toName="i" choice="multiple">'
        '<Choice value="RUST"/><Choice value="Rust"/></Choices></View>'
    )
    mapping = map_controls(config, ["rust", "Rust"])
    assert mapping.bindings[0].labels == ("Rust",)
    assert mapping.bindings[0].class_indices == (1,)
    assert mapping.unused_classes == ["rust"]


def test_class_offered_by_two_controls_is_bound_in_both() -> None:
    config = parse_label_config(
        '<View><Image name="i" value="$i"/>'
        '<Choices name="a" toName="i" choice="multiple"><Choice value="x"/><Choice value="y"/>'
        '</Choices><Choices name="b" toName="i"><Choice value="x"/></Choices></View>'
    )
    mapping = map_controls(config, ["x", "y"])
    assert [(b.control.name, b.class_indices) for b in mapping.bindings] == [
        ("a", (0, 1)),
        ("b", (0,)),
    ]
    assert mapping.n_classes == 2


def test_no_class_matches() -> None:
    config = parse_label_config(FIXTURE_CONFIG)
    with pytest.raises(LabelConfigError, match="no choice .* matches") as error:
        map_controls(config, ["cat", "dog"])
    message = str(error.value)
    assert "'component': ['bolt', 'nut', 'gear']" in message
    assert "['cat', 'dog']" in message


def test_duplicate_model_classes_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        map_controls(parse_label_config(FIXTURE_CONFIG), ["bolt", "bolt"])
