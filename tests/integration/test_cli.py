from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from labelloop.cli import app
from labelloop.store import ModelStore

runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_console_script_help_lists_the_commands() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "labelloop", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    for command in ("train", "evaluate", "predict", "demo-data", "demo", "versions", "rollback"):
        assert command in done.stdout


def test_log_records_after_a_cli_call_reach_the_current_stderr(capsys) -> None:
    """CliRunner lends the command a stderr of its own and closes it afterwards; the logging the
    command configured must not stay bound to it (a later record, like the Label Studio
    launcher's in a session fixture, would be a `--- Logging error ---` on a closed file)."""
    assert invoke("--log-level", "INFO", "versions", "--help").exit_code == 0
    logging.getLogger("labelloop.dev.launcher").info("a record after the CLI call")
    err = capsys.readouterr().err
    assert "a record after the CLI call" in err
    assert "Logging error" not in err


def test_train_help_explains_the_common_flags() -> None:
    result = invoke("train", "--help")
    assert result.exit_code == 0
    for flag in (
        "--epochs",
        "--batch-size",
        "--image-size",
        "--backbone",
        "--lr",
        "--patience",
        "--seed",
        "--config",
        "--allow-new-classes",
        "--init-from",
        "--init-mode",
        "--resume",
        "--materialize-splits",
        "--label-columns",
        "--labelstudio-export",
    ):
        assert flag in result.output, flag


def test_demo_data_command(tmp_path: Path) -> None:
    result = invoke("demo-data", "--out", tmp_path, "--n", "6", "--size", "40", "--seed", "2")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "images").glob("*.png"))) == 6
    assert (tmp_path / "label_config.xml").is_file()


def test_unknown_labels_exit_2_with_the_list_and_no_traceback(demo_dataset, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[data]\nclasses = {components = ["bolt", "nut"]}\n')
    result = invoke(
        "--log-level",
        "ERROR",
        "train",
        "--model-dir",
        tmp_path / "m",
        "--images",
        demo_dataset.images_dir,
        "--metadata",
        demo_dataset.metadata_csv,
        "--config",
        config,
        "--weights",
        "none",
    )
    assert result.exit_code == 2
    assert "'washer' x" in result.output and "--allow-new-classes" in result.output
    assert "Traceback" not in result.output
    assert ModelStore(tmp_path / "m").current_version() is None


def test_bad_flag_value_is_a_usage_error(demo_dataset, tmp_path: Path) -> None:
    result = invoke(
        "train",
        "--model-dir",
        tmp_path,
        "--images",
        demo_dataset.images_dir,
        "--metadata",
        demo_dataset.metadata_csv,
        "--backbone",
        "vgg11",
    )
    assert result.exit_code == 2
    assert "backbone must be auto or one of" in result.output


def test_train_with_config_file_and_flags(demo_dataset, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("preprocess:\n  image_size: 32\noptim:\n  epochs: 5\n  batch_size: 32\n")
    result = invoke(
        "train",
        "--model-dir",
        tmp_path / "m",
        "--images",
        demo_dataset.images_dir,
        "--metadata",
        demo_dataset.metadata_csv,
        "--config",
        config,
        "--epochs",
        "1",
        "--weights",
        "none",
        "--no-progress",
        "--materialize-splits",
        tmp_path / "layout",
    )
    assert result.exit_code == 0, result.output
    assert "Report:" in result.output and "macro-F1" in result.output
    version = ModelStore(tmp_path / "m").current_version()
    saved = json.loads((tmp_path / "m" / "versions" / version / "config.json").read_text())
    assert saved["optim"]["epochs"] == 1  # the flag beat the file
    assert saved["optim"]["batch_size"] == 32  # the file beat the default
    assert saved["preprocess"]["image_size"] == 32
    assert {p.name for p in (tmp_path / "layout").iterdir()} == {"train", "val", "test"}


def test_evaluate_command(trained_model, demo_dataset, tmp_path: Path) -> None:
    model_dir, _ = trained_model
    result = invoke(
        "evaluate",
        "--model-dir",
        model_dir,
        "--images",
        demo_dataset.images_dir,
        "--metadata",
        demo_dataset.metadata_csv,
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_samples"] == 120
    assert (tmp_path / "report.md").is_file() and (tmp_path / "predictions.csv").is_file()


def test_predict_command_reports_unreadable_images(
    trained_model, demo_dataset, tmp_path: Path
) -> None:
    model_dir, outcome = trained_model
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    images = sorted(demo_dataset.images_dir.glob("*.png"))[:3] + [broken]
    out = tmp_path / "pred.csv"
    result = invoke("predict", *images, "--model-dir", model_dir, "--out", out)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["image"] for r in rows] == [str(p) for p in images]
    assert rows[-1]["error"] == "could not be read"
    classes = json.loads((outcome.version_dir / "classes.json").read_text())
    thresholds = json.loads((outcome.version_dir / "thresholds.json").read_text())
    for row in rows[:-1]:
        assert row["error"] == ""
        pairs = zip(classes, thresholds, strict=True)
        expected = [c for c, t in pairs if float(row[f"p_{c}"]) >= t - 1e-4]
        assert set(row["predicted"].split(";")) - {""} <= set(expected)
        assert 0.0 <= float(row["confidence"]) <= 1.0


def test_versions_and_rollback(trained_model, tmp_path: Path) -> None:
    model_dir, outcome = trained_model
    result = invoke("versions", "--model-dir", model_dir)
    assert result.exit_code == 0
    assert f"* {outcome.version}" in result.output
    result = invoke("rollback", "v99-20200101T000000", "--model-dir", model_dir)
    assert result.exit_code == 2
    assert ModelStore(model_dir).current_version() == outcome.version


def test_missing_model_dir_is_a_clear_error(tmp_path: Path) -> None:
    result = invoke("predict", tmp_path / "x.png", "--model-dir", tmp_path)
    assert result.exit_code == 2
    assert "holds no model" in result.output


def test_demo_without_label_studio_trains_and_reports(tmp_path: Path) -> None:
    result = invoke(
        "demo",
        "--workdir",
        tmp_path,
        "--n",
        "60",
        "--size",
        "40",
        "--epochs",
        "1",
        "--no-label-studio",
    )
    assert result.exit_code == 0, result.output
    assert "Test macro-F1" in result.output
    report = Path(result.output.split("Report: ")[1].split()[0])
    assert report.is_file()
    again = invoke("demo", "--workdir", tmp_path, "--no-label-studio")
    assert "Reusing the model" in again.output


def test_status_shows_version_ledger_and_jobs(trained_model, tmp_path: Path) -> None:
    import shutil

    from labelloop.loop.ledger import Ledger

    model_dir = tmp_path / "m"
    shutil.copytree(trained_model[0], model_dir)
    result = invoke("status", "--model-dir", model_dir)
    assert result.exit_code == 0
    assert f"base model: {trained_model[1].version}" in result.output
    assert "no annotations recorded yet" in result.output
    with Ledger(model_dir / "ledger.sqlite3") as ledger:
        job = ledger.create_job(3, "fast", "start_training")
        ledger.update_job(
            job.id, state="rejected", metrics={"candidate_f1": 0.4, "current_f1": 0.5}
        )
        ledger.create_job(4, "full", "auto")
    result = invoke("status", "--model-dir", model_dir)
    assert result.exit_code == 0, result.output
    assert f"project 3: serves the base model ({trained_model[1].version})" in result.output
    assert f"#{job.id} fast rejected  (start_training)" in result.output
    assert "held-out macro-F1 0.400 (was 0.500)" in result.output
    only = invoke("status", "--model-dir", model_dir, "--project", "4").output
    assert "project 4:" in only and "project 3:" not in only


def test_versions_and_rollback_of_a_project_lineage(trained_model, tmp_path: Path) -> None:
    import shutil

    from labelloop.lineages import project_store

    model_dir = tmp_path / "m"
    shutil.copytree(trained_model[0], model_dir)
    base = trained_model[1].version
    result = invoke("versions", "--model-dir", model_dir, "--project", "5")
    assert result.exit_code == 0
    assert f"no version of its own yet; it is served the base model ({base})" in result.output
    # Two versions in project 5's lineage (copies of the base's files are enough here).
    lineage = project_store(model_dir, 5)
    lineage.versions_dir.mkdir(parents=True)
    names = ["v1-20260101T000000", "v2-20260102T000000"]
    for name in names:
        shutil.copytree(ModelStore(model_dir).version_dir(base), lineage.versions_dir / name)
        manifest = lineage.versions_dir / name / "manifest.json"
        manifest.write_text(manifest.read_text().replace(base, name))
    lineage.set_current(names[1])
    listed = invoke("versions", "--model-dir", model_dir).output
    assert f"* {base}" in listed and "  5: v2-20260102T000000 (2 versions)" in listed
    result = invoke("rollback", names[0], "--model-dir", model_dir, "--project", "5")
    assert result.exit_code == 0, result.output
    assert "project 5: current -> v1-20260101T000000" in result.output
    assert lineage.current_version() == names[0]
    assert ModelStore(model_dir).current_version() == base  # the base is left alone
    assert f"* {names[0]}" in invoke("versions", "--model-dir", model_dir, "--project", "5").output
    bad = invoke("rollback", base, "--model-dir", model_dir, "--project", "5")
    assert bad.exit_code == 2 and "no version" in bad.output


def test_review_lists_suspect_annotations_as_json(trained_model, demo_dataset, tmp_path) -> None:
    import csv
    import json
    import shutil

    from labelloop.labelstudio.annotations import AnnotationRecord
    from labelloop.loop.ledger import Ledger

    model_dir = tmp_path / "m"
    shutil.copytree(trained_model[0], model_dir)
    with demo_dataset.metadata_csv.open() as handle:
        rows = list(csv.DictReader(handle))[:60]
    config = demo_dataset.label_config.read_text()
    with Ledger(model_dir / "ledger.sqlite3") as ledger:
        ledger.set_label_config(3, config)
        ledger.upsert(
            [
                AnnotationRecord(
                    3,
                    100 + i,
                    1 + i,
                    f"/data/local-files/?d=images/{row['image_id']}",
                    {
                        g: tuple(x for x in row[g].split(";") if x)
                        for g in ("components", "defects")
                    },
                    "2026-12-02T00:00:00Z",
                    False,
                    False,
                    1,
                )
                for i, row in enumerate(rows)
            ]
        )
        annotated = {t.task_id: t.labels for t in ledger.training_set(3)}
    env = {
        "LABEL_STUDIO_URL": "http://127.0.0.1:1",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(demo_dataset.root),
    }
    result = runner.invoke(
        app,
        [
            "review",
            "--project",
            "3",
            "--model-dir",
            str(model_dir),
            "--top",
            "5",
            "--format",
            "json",
        ],
        env=env,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    flags = json.loads(result.stdout)
    assert 0 < len(flags) <= 5
    assert [f["score"] for f in flags] == sorted((f["score"] for f in flags), reverse=True)
    for flag in flags:
        # Each flag is an annotation as the ledger holds it, which the model contradicts.
        assert (flag["label"] in annotated[flag["task_id"]][flag["control"]]) is flag["annotated"]
        assert (flag["probability"] < 0.5) is flag["annotated"]
    table = runner.invoke(
        app, ["review", "--project", "3", "--model-dir", str(model_dir), "--top", "3"], env=env
    )
    assert "task" in table.output.lower()
    unknown = runner.invoke(
        app, ["review", "--project", "9", "--model-dir", str(model_dir)], env=env
    )
    assert unknown.exit_code == 2 and "project 9" in unknown.output
