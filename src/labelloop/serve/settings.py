"""Server settings, read once at start-up from flags and the environment variables that Label
Studio ML-backend users already know."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from labelloop.config import ConfigError
from labelloop.labelstudio.urls import http_base_url
from labelloop.ml.selection import DEFAULT_HORIZON, DEFAULT_STRATEGY, Strategy
from labelloop.runtime.inference import Runtime


class ServeSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_dir: Path
    host: str = "127.0.0.1"
    port: int = Field(9090, ge=1, le=65535)
    label_studio_url: str | None = None
    label_studio_api_key: SecretStr | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: SecretStr | None = None
    document_root: Path | None = None
    # Label Studio's own data directory, when it runs on this machine: uploads are read from its
    # media folder instead of downloaded through Label Studio.
    label_studio_data_dir: Path | None = None
    cache_dir: Path | None = None
    cache_max_mb: int = Field(512, ge=0)
    batch_size: int = Field(16, ge=1, le=512)
    fetch_workers: int = Field(8, ge=1, le=64)
    fetch_timeout_s: float = Field(15.0, gt=0)
    # A request body bigger than this gets a 413 before it is buffered. Label Studio sends every
    # selected task in one /predict (about 1 KB each), so 256 MB leaves room for 100k+ tasks.
    max_request_mb: int = Field(256, ge=1)
    log_level: str = "INFO"
    # After a promotion: re-predict unlabelled tasks and push them, and rename our ML backend
    # entry to the new version so Label Studio's score column and uncertainty sampling use it.
    refresh: bool = True
    rename_backend: bool = True
    # The URL Label Studio reaches us at (to find our ML backend entry); default http://host:port.
    public_url: str | None = None
    # Image hosts besides Label Studio's (comma-separated in the env); unset: any host that is
    # not link-local or a cloud metadata address.
    allowed_image_hosts: tuple[str, ...] | None = None
    # Where forward passes run (labelloop.inference): auto = CUDA if present, else ONNX Runtime
    # when it reproduces PyTorch's outputs, else PyTorch.
    runtime: Runtime = "auto"
    # Models kept in memory at once (the base model and projects' versions, least recently
    # used unloaded first): 50 connected projects must not hold 50 models.
    max_loaded_models: int = Field(4, ge=1, le=256)
    # The distributed mode (docs/deployment.md); all unset: embedded, as on one laptop.
    # The ledger and jobs: a PostgreSQL URL (else a SQLite file in MODEL_DIR).
    database_url: SecretStr | None = None
    # Model versions: an object store URL such as s3://bucket/prefix (else MODEL_DIR itself,
    # which is then only a cache of it), and how often each lineage's `current` is re-read.
    store_url: str | None = None
    store_poll_seconds: float = Field(2.0, gt=0, le=300)
    # Training jobs: a Redis URL; `labelloop worker` processes run them (else a thread here).
    queue_url: SecretStr | None = None
    # What the prediction score of an unlabelled task means (ml.selection, loop.ordering):
    # its labelling priority over the project's pool, or the served margin ("margin").
    priority: Strategy = DEFAULT_STRATEGY
    priority_horizon: int = Field(DEFAULT_HORIZON, ge=0, le=100_000)

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.label_studio_url is not None:
            http_base_url(self.label_studio_url)
        db = self.database_url.get_secret_value() if self.database_url else None
        if db is not None and not db.startswith(("postgresql://", "postgresql+psycopg://")):
            raise ValueError(
                "LABELLOOP_DATABASE_URL must be a postgresql:// URL (unset: the SQLite ledger "
                "in MODEL_DIR)"
            )
        queue = self.queue_url.get_secret_value() if self.queue_url else None
        if queue is not None and not queue.startswith(("redis://", "rediss://")):
            raise ValueError("LABELLOOP_QUEUE_URL must be a redis:// or rediss:// URL")
        if queue is not None and db is None:
            raise ValueError(
                "LABELLOOP_QUEUE_URL needs LABELLOOP_DATABASE_URL too: workers and serving "
                "replicas must share one ledger"
            )
        if self.store_url is not None and "://" not in self.store_url:
            raise ValueError(
                "LABELLOOP_STORE_URL must be an object store URL such as s3://bucket/prefix "
                "(unset: versions stay in MODEL_DIR)"
            )
        return self

    @property
    def distributed(self) -> bool:
        """Jobs go to workers: this process serves and never trains."""
        return self.queue_url is not None

    def ledger_location(self) -> Path | str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return self.model_dir / "ledger.sqlite3"

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user)

    @property
    def backend_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


ENV_NAMES = {
    "model_dir": "MODEL_DIR",
    "label_studio_url": "LABEL_STUDIO_URL",
    "label_studio_api_key": "LABEL_STUDIO_API_KEY",
    "basic_auth_user": "BASIC_AUTH_USER",
    "basic_auth_pass": "BASIC_AUTH_PASS",
    "document_root": "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT",
    "label_studio_data_dir": "LABEL_STUDIO_BASE_DATA_DIR",
    "cache_dir": "LABELLOOP_CACHE_DIR",
    "log_level": "LOG_LEVEL",
    "public_url": "LABELLOOP_PUBLIC_URL",
    "allowed_image_hosts": "LABELLOOP_ALLOWED_IMAGE_HOSTS",
    "runtime": "LABELLOOP_RUNTIME",
    "max_request_mb": "LABELLOOP_MAX_REQUEST_MB",
    "max_loaded_models": "LABELLOOP_MAX_LOADED_MODELS",
    "database_url": "LABELLOOP_DATABASE_URL",
    "store_url": "LABELLOOP_STORE_URL",
    "store_poll_seconds": "LABELLOOP_STORE_POLL_SECONDS",
    "queue_url": "LABELLOOP_QUEUE_URL",
    "priority": "LABELLOOP_PRIORITY",
    "priority_horizon": "LABELLOOP_PRIORITY_HORIZON",
}


def settings_from(
    flags: Mapping[str, object], environ: Mapping[str, str] | None = None
) -> ServeSettings:
    """Flags win over environment variables; empty values count as unset."""
    environ = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for field, env in ENV_NAMES.items():
        if environ.get(env):
            raw[field] = environ[env]
    raw.update({k: v for k, v in flags.items() if v is not None})
    if isinstance(raw.get("allowed_image_hosts"), str):
        hosts = str(raw["allowed_image_hosts"]).split(",")
        raw["allowed_image_hosts"] = tuple(h.strip() for h in hosts if h.strip())
    if raw.get("label_studio_url"):
        raw["label_studio_url"] = str(raw["label_studio_url"]).strip().rstrip("/")
    try:
        return ServeSettings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_NAMES.get(str(err['loc'][0]), err['loc'][0]) if err['loc'] else 'settings'}: "
            f"{err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid server settings: {problems}") from None
