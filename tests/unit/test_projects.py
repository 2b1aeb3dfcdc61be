"""Per-project lineages: the layout migration, and which model serves a project (bounded LRU)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from labelloop.config import PreprocessConfig
from labelloop.labels import LabelSpace
from labelloop.labelstudio.label_config import parse_label_config
from labelloop.lineages import migrate_layout, project_root, project_store, projects_with_lineage
from labelloop.ml.model import build_model
from labelloop.runtime.projects import ProjectModels
from labelloop.store import ModelStore, manifest_for, write_model_files

SPACE = LabelSpace.from_mapping({"components": ["bolt", "nut"], "defects": ["rust"]})
BASE_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="components" toName="image" choice="multiple">'
    '<Choice value="bolt"/><Choice value="nut"/></Choices></View>'
)
OTHER_CONFIG = (
    '<View><Image name="photo" value="$photo"/>'
    '<Choices name="quality" toName="photo"><Choice value="good"/><Choice value="bad"/>'
    "</Choices></View>"
)


def publish(store: ModelStore, *, seed: int, project: int | None = None, current=True) -> str:
    """A tiny real version; `project` marks it as trained by that project's loop."""
    torch.manual_seed(seed)
    model = build_model("mobilenet_v2", len(SPACE))
    version = store.next_version_name()
    training = {"incremental": {"kind": "fast", "project": project}} if project else {}
    with store.staging() as staged:
        write_model_files(staged, model, SPACE, [0.5, 0.5, 0.5])
        store.publish(
            staged,
            manifest_for(
                version=version,
                backbone="mobilenet_v2",
                dropout=0.0,
                label_space=SPACE,
                preprocess=PreprocessConfig(image_size=32),
                training_config=training,
            ),
            make_current=current,
        )
    return version


def test_project_ids_are_checked_before_they_become_paths(tmp_path: Path) -> None:
    assert project_root(tmp_path, 12) == tmp_path / "projects" / "12"
    for bad in (0, -3, True, "1/../../etc"):
        with pytest.raises(ValueError, match="positive integer"):
            project_root(tmp_path, bad)  # type: ignore[arg-type]


def test_migration_moves_each_loop_version_to_the_project_that_trained_it(
    tmp_path: Path, caplog
) -> None:
    base = ModelStore(tmp_path)
    offline = publish(base, seed=0)
    a1 = publish(base, seed=1, project=3)
    b1 = publish(base, seed=2, project=5)
    a2 = publish(base, seed=3, project=3)  # current: the last promotion, project 3's
    with caplog.at_level(logging.WARNING, logger="labelloop.lineages"):
        migration = migrate_layout(tmp_path)
    assert migration.moved == {3: [a1, a2], 5: [b1]}
    assert base.versions() == [offline] and base.current_version() == offline
    assert project_store(tmp_path, 3).versions() == [a1, a2]
    assert project_store(tmp_path, 3).current_version() == a2  # kept what was served
    assert project_store(tmp_path, 5).current_version() == b1  # its newest
    assert projects_with_lineage(tmp_path) == [3, 5]
    assert any("per-project lineages" in r.getMessage() for r in caplog.records)
    # Idempotent: a second start-up finds nothing to move.
    assert not migrate_layout(tmp_path).changed
    assert base.current_version() == offline


def test_migration_gives_unnamed_loop_versions_to_the_only_project(tmp_path: Path) -> None:
    base = ModelStore(tmp_path)
    offline = publish(base, seed=0)
    older = publish(base, seed=1, project=None)
    # An older release recorded no project in the manifest: mark it as the loop's anyway.
    manifest_path = base.version_dir(older) / "manifest.json"
    text = manifest_path.read_text().replace(
        '"training_config": {}', '"training_config": {"incremental": {"kind": "fast"}}'
    )
    manifest_path.write_text(text)
    assert migrate_layout(tmp_path).unassigned == [older]  # which project is unknown
    assert base.versions() == [offline, older]
    migration = migrate_layout(tmp_path, sole_project=9)
    assert migration.moved == {9: [older]}


def test_a_project_is_served_its_lineage_else_the_base_and_never_anothers(tmp_path: Path) -> None:
    base = ModelStore(tmp_path)
    base_version = publish(base, seed=0)
    models = ProjectModels(tmp_path, runtime="torch")
    assert models.serving(None).version == base_version
    assert models.serving(4).version == base_version  # no lineage yet
    own = publish(models.store(4), seed=1)
    assert models.serving(4).version == own
    assert models.serving(5).version == base_version
    assert models.versions() == {"base": base_version, "4": own}
    # The base model is a parent only where some choice is one of its classes.
    assert models.parent_for(5, parse_label_config(BASE_CONFIG)).version == base_version
    assert models.parent_for(5, parse_label_config(OTHER_CONFIG)) is None
    assert models.parent_for(4, parse_label_config(OTHER_CONFIG)).version == own


def test_more_projects_than_the_lru_holds_are_evicted_and_reloaded(tmp_path: Path) -> None:
    loads: list[float] = []
    models = ProjectModels(tmp_path, runtime="torch", max_loaded=2, on_load=loads.append)
    versions = {p: publish(models.store(p), seed=p) for p in (1, 2, 3)}
    batch = torch.rand(2, 3, 32, 32)
    first = {p: models.serving(p).runner(batch) for p in (1, 2, 3)}
    assert len(models.loaded()) == 2  # bounded: project 1's model was unloaded
    assert [v for _, v in models.loaded()] == [versions[2], versions[3]]
    again = models.serving(1)  # reloaded from its lineage, the same weights
    assert again.version == versions[1]
    np.testing.assert_allclose(again.runner(batch), first[1], rtol=1e-5, atol=1e-6)
    assert len(loads) == 4 and len(models.loaded()) == 2
    assert models.serving(3) is models.serving(3)  # a hit does not load


def test_a_current_that_cannot_be_loaded_keeps_the_last_good_model(tmp_path: Path, caplog) -> None:
    models = ProjectModels(tmp_path, runtime="torch", max_loaded=1)
    store = models.store(2)
    good = publish(store, seed=0)
    assert models.serving(2).version == good
    bad = publish(store, seed=1)
    (store.version_dir(bad) / "model.pth").write_bytes(b"corrupt")
    publish(ModelStore(tmp_path), seed=2)
    models.serving(None)  # the base model takes the only slot: the good one is evicted
    with caplog.at_level(logging.ERROR, logger="labelloop.runtime.projects"):
        assert models.serving(2).version == good  # reloaded, still serving
        assert models.serving(2).version == good
    errors = [r for r in caplog.records if "cannot be loaded" in r.getMessage()]
    assert len(errors) == 1  # said once, not at every request
