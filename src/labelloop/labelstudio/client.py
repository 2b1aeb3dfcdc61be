"""A small typed client for the parts of Label Studio's REST API that labelloop uses.

Checked against label-studio 1.23.2 (its Django source and a real server). Auth is a legacy API
token or a personal access token (:class:`labelloop.labelstudio.auth.LabelStudioAuth`); legacy
tokens need the server started with them enabled (see :mod:`labelloop.dev.launcher`).

Paths are spelled exactly as Label Studio routes them (trailing slashes included): a
missing slash gets a 301 from Django, which this client reports as an error instead of
following.
"""

from __future__ import annotations

import json
import mimetypes
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from labelloop.labelstudio.auth import LabelStudioAuth

__all__ = ["LabelStudioAPIError", "LabelStudioClient"]

_EXCERPT = 500


class LabelStudioAPIError(RuntimeError):
    """Label Studio answered with a non-2xx status (or with something that isn't JSON)."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        self.method = method
        self.path = path
        self.body = body[:_EXCERPT]
        super().__init__(f"Label Studio {method} {path} -> HTTP {status}: {self.body}")


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class LabelStudioClient:
    """Synchronous client over httpx; usable as a context manager."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 120) -> None:
        """`token`: a legacy token or a personal access token (exchanged and renewed)."""
        self.url = url.rstrip("/")
        self._auth = LabelStudioAuth(self.url, token)
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Accept": "application/json"},
            auth=self._auth,  # fresh headers per request; one retry after a 401
            timeout=timeout_s,
            follow_redirects=False,
            trust_env=False,  # never send loopback traffic through a proxy from the env
        )

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise LabelStudioAPIError(0, method, path, f"timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise LabelStudioAPIError(0, method, path, f"connection failed: {exc}") from exc
        if not response.is_success:
            raise LabelStudioAPIError(response.status_code, method, path, response.text)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if not response.content:
            return None
        try:
            return response.json()
        except json.JSONDecodeError as exc:
            raise LabelStudioAPIError(
                response.status_code, method, path, f"not JSON: {response.text}"
            ) from exc

    # ------------------------------------------------------------------ server / projects

    def health(self) -> bool:
        try:
            return self._http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def version(self) -> dict[str, Any]:
        return self._json("GET", "/api/version/")

    def create_project(self, title: str, label_config: str) -> dict[str, Any]:
        return self._json(
            "POST", "/api/projects/", json={"title": title, "label_config": label_config}
        )

    def projects(self) -> list[dict[str, Any]]:
        reply = self._json("GET", "/api/projects/", params={"page_size": 1000})
        return list(reply["results"]) if isinstance(reply, dict) else list(reply)

    def export_annotated(self, project_id: int) -> list[dict[str, Any]]:
        """Every task with at least one annotation, annotations included (JSON export).

        Unlike listing tasks through the Data Manager, an export never makes Label Studio ask
        the backend for predictions.
        """
        return list(
            self._json("GET", f"/api/projects/{project_id}/export", params={"exportType": "JSON"})
        )

    def export_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project (data and annotations), without triggering predictions."""
        return list(
            self._json(
                "GET",
                f"/api/projects/{project_id}/export",
                params={"exportType": "JSON", "download_all_tasks": "true"},
            )
        )

    def get_project(self, project_id: int) -> dict[str, Any]:
        return self._json("GET", f"/api/projects/{project_id}/")

    def update_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        return self._json("PATCH", f"/api/projects/{project_id}/", json=fields)

    # ------------------------------------------------------------------ import

    def import_files(self, project_id: int, files: Sequence[Path], *, batch: int = 50) -> list[int]:
        """Upload image files as tasks (multipart; one ``fileN`` field per file).

        Label Studio keeps only the last file of a repeated field name, hence the distinct
        names. Returns the ids of the created tasks, in upload order.
        """
        if batch < 1:
            raise ValueError("batch must be >= 1")
        files = [Path(f) for f in files]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f)
        path = f"/api/projects/{project_id}/import"
        task_ids: list[int] = []
        for chunk in _chunks(files, batch):
            with ExitStack() as stack:
                multipart = {
                    f"file{i}": (
                        f.name,
                        stack.enter_context(open(f, "rb")),
                        mimetypes.guess_type(f.name)[0] or "application/octet-stream",
                    )
                    for i, f in enumerate(chunk)
                }
                reply = self._json(
                    "POST", path, params={"return_task_ids": "true"}, files=multipart
                )
            task_ids.extend(self._created_task_ids(project_id, reply))
        return task_ids

    def _created_task_ids(self, project_id: int, reply: Any, *, poll_s: float = 600) -> list[int]:
        """Task ids from an import reply.

        The Community edition imports synchronously and answers ``task_ids`` (with
        ``return_task_ids=true``); other editions answer ``{"import": <id>}`` and import in
        the background, so poll that import until it is done.
        """
        path = f"/api/projects/{project_id}/import"
        if isinstance(reply, dict) and "task_ids" in reply:
            return [int(i) for i in reply["task_ids"]]
        if isinstance(reply, dict) and "import" in reply:
            status_path = f"/api/projects/{project_id}/imports/{reply['import']}/"
            deadline = time.monotonic() + poll_s
            while time.monotonic() < deadline:
                state = self._json("GET", status_path)
                if state.get("status") == "completed":
                    return [int(i) for i in state.get("task_ids") or []]
                if state.get("status") == "failed":
                    raise LabelStudioAPIError(200, "GET", status_path, f"import failed: {state}")
                time.sleep(0.5)
            raise LabelStudioAPIError(0, "GET", status_path, "import did not finish in time")
        if isinstance(reply, dict) and isinstance(reply.get("task_count"), int):
            count = reply["task_count"]
            if count == 0:
                return []
            # Last resort: a synchronous import's tasks are the project's newest ids.
            ids = sorted(int(t["id"]) for t in self.list_tasks(project_id))
            return ids[-count:]
        raise LabelStudioAPIError(201, "POST", path, f"no task ids in the reply: {reply}")

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Import tasks as JSON: ``{"data": {...}, "predictions": [...]}`` or flat ``{...}``."""
        if not tasks:
            return []
        reply = self._json(
            "POST",
            f"/api/projects/{project_id}/import",
            params={"return_task_ids": "true"},
            json=tasks,
        )
        return self._created_task_ids(project_id, reply)

    def import_predictions(self, project_id: int, predictions: list[dict[str, Any]]) -> int:
        """Store predictions directly: items ``{"task", "result", "score", "model_version"}``.

        ~40x faster than *Retrieve Predictions* for many tasks. Returns how many were created.
        """
        reply = self._json(
            "POST", f"/api/projects/{project_id}/import/predictions", json=predictions
        )
        return int(reply.get("created", 0)) if isinstance(reply, dict) else 0

    def add_local_storage(
        self,
        project_id: int,
        path: Path,
        *,
        regex: str = r".*\.(png|jpe?g)$",
        title: str = "local",
    ) -> dict[str, Any]:
        """Attach a directory under the document root as local storage and sync it.

        Label Studio matches ``regex`` against file *names* (not paths), refuses the document
        root itself, and makes tasks whose image is ``<host>/data/local-files/?d=<relative>``.
        Returns the storage after the sync (``last_sync_count`` = tasks created).
        """
        storage = self._json(
            "POST",
            "/api/storages/localfiles/",
            json={
                "project": project_id,
                "title": title,
                "path": str(Path(path).resolve()),
                "regex_filter": regex,
                "use_blob_urls": True,
            },
        )
        sync_path = f"/api/storages/localfiles/{storage['id']}/sync"
        synced = self._json("POST", sync_path)
        # Without Redis the sync runs inside the request; a failure is swallowed there and
        # only shows as the storage's status.
        if isinstance(synced, dict) and synced.get("status") == "failed":
            raise LabelStudioAPIError(
                200, "POST", sync_path, f"storage sync failed: {synced.get('traceback') or synced}"
            )
        return synced

    # ------------------------------------------------------------------ ML backends

    def connect_ml_backend(
        self,
        project_id: int,
        url: str,
        *,
        title: str = "labelloop",
        basic_auth: tuple[str, str] | None = None,
        is_interactive: bool = False,
        timeout_s: float | None = None,
        extra_params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Connect an ML backend (Label Studio calls its ``/health`` and ``/setup`` first).

        Label Studio sets ``project.model_version`` to the backend's *title* when the project
        has none; rename it with :meth:`update_ml_backend` to move that.
        """
        body: dict[str, Any] = {
            "project": project_id,
            "url": url,
            "title": title,
            "is_interactive": is_interactive,
        }
        if basic_auth is not None:
            user, password = basic_auth
            body.update(
                {"auth_method": "BASIC_AUTH", "basic_auth_user": user, "basic_auth_pass": password}
            )
        else:
            body["auth_method"] = "NONE"
        if timeout_s is not None:
            body["timeout"] = timeout_s
        if extra_params is not None:
            body["extra_params"] = extra_params
        return self._json("POST", "/api/ml/", json=body)

    def get_ml_backend(self, ml_backend_id: int) -> dict[str, Any]:
        return self._json("GET", f"/api/ml/{ml_backend_id}")

    def update_ml_backend(self, ml_backend_id: int, **fields: Any) -> dict[str, Any]:
        """PATCH an ML backend, e.g. ``title=<live model version>``.

        Label Studio 1.23.2 re-validates the backend on every PATCH (``/health`` and
        ``/setup`` again) and answers 500 unless ``url`` and ``project`` are in the body, and
        400 for a BASIC_AUTH backend without ``basic_auth_user``/``basic_auth_pass`` (an
        empty password keeps the stored one). Those are filled in from the current state.
        """
        current = self.get_ml_backend(ml_backend_id)
        body: dict[str, Any] = {
            "url": current["url"],
            "project": current["project"],
            "auth_method": current.get("auth_method") or "NONE",
        }
        if body["auth_method"] == "BASIC_AUTH":
            body["basic_auth_user"] = current.get("basic_auth_user") or ""
            body["basic_auth_pass"] = ""
        body.update(fields)
        return self._json("PATCH", f"/api/ml/{ml_backend_id}", json=body)

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        return self._json("GET", "/api/ml/", params={"project": project_id})

    def train(self, ml_backend_id: int) -> httpx.Response:
        """Ask the backend to train (``START_TRAINING`` webhook).

        Label Studio answers 200 even when the backend failed: check the backend's
        ``state`` (``"ER"``) and ``error_message`` via :meth:`ml_backends`.
        """
        return self._request("POST", f"/api/ml/{ml_backend_id}/train", json={})

    def retrieve_predictions(
        self, project_id: int, task_ids: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """Data Manager action *Retrieve Predictions* (one synchronous ``/predict``)."""
        selected: dict[str, Any] = (
            {"all": True, "excluded": []}
            if task_ids is None
            else {"all": False, "included": [int(t) for t in task_ids]}
        )
        return self._json(
            "POST",
            "/api/dm/actions/",
            params={"id": "retrieve_tasks_predictions", "project": project_id},
            json={"selectedItems": selected},
        )

    def predictions(
        self, project_id: int | None = None, task_id: int | None = None
    ) -> list[dict[str, Any]]:
        params: dict[str, int] = {}
        if project_id is not None:
            params["project"] = project_id
        if task_id is not None:
            params["task"] = task_id
        reply = self._json("GET", "/api/predictions/", params=params)
        if isinstance(reply, dict) and "results" in reply:  # paginated variant
            return list(reply["results"])
        return list(reply)

    def set_prediction_score(self, prediction_id: int, score: float) -> None:
        """Change only the score of a stored prediction (what the Data Manager sorts by)."""
        self._request("PATCH", f"/api/predictions/{prediction_id}/", json={"score": score})

    def delete_prediction(self, prediction_id: int) -> None:
        self._request("DELETE", f"/api/predictions/{prediction_id}/")

    def delete_version_predictions(self, project_id: int, model_version: str) -> int:
        """Delete every prediction of `model_version` in the project in one call; returns how
        many were deleted.

        Label Studio also clears the project's live model version when it is this one.
        """
        reply = self._json(
            "DELETE",
            f"/api/projects/{project_id}/model-versions/",
            json={"model_version": model_version},
        )
        count = reply.get("deleted_predictions") if isinstance(reply, dict) else reply
        return int(count) if isinstance(count, int) else 0

    # ------------------------------------------------------------------ tasks / annotations

    def list_tasks(
        self, project_id: int, *, page_size: int = 100, include: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """All tasks of a project through the Data Manager: with annotations and predictions
        (``fields=all``), or only the ``include`` fields (much faster: 2,000 tasks with
        ``id,data`` take ~1 s where the export takes ~7 s).

        If the project has "retrieve predictions automatically" on, Label Studio asks the ML
        backends for every listed task without a prediction. Keep ``page_size`` at most 500:
        SQLite refuses larger pages.
        """
        tasks: list[dict[str, Any]] = []
        fields = {"include": ",".join(include)} if include else {"fields": "all"}
        page = 1
        while True:
            try:
                reply = self._json(
                    "GET",
                    "/api/tasks/",
                    params={"project": project_id, "page": page, "page_size": page_size, **fields},
                )
            except LabelStudioAPIError as exc:
                if exc.status == 404 and page > 1:  # DRF: "Invalid page." past the end
                    break
                raise
            if isinstance(reply, list):  # unpaginated variant
                return reply
            batch = reply.get("tasks", [])
            tasks.extend(batch)
            total = reply.get("total")
            if not batch or len(batch) < page_size or (total is not None and len(tasks) >= total):
                break
            page += 1
        return tasks

    def tasks_by_prediction_score(self, project_id: int) -> list[dict[str, Any]]:
        """The project's tasks as the Data Manager sorts them by *Prediction score*, lowest
        first (what uncertainty sampling serves first)."""
        query = json.dumps({"ordering": ["tasks:predictions_score"]})
        reply = self._json(
            "GET",
            "/api/tasks/",
            params={"project": project_id, "fields": "all", "page_size": 1000, "query": query},
        )
        return list(reply.get("tasks", [])) if isinstance(reply, dict) else list(reply)

    def get_task(self, task_id: int) -> dict[str, Any]:
        return self._json("GET", f"/api/tasks/{task_id}/")

    def create_annotation(
        self, task_id: int, result: list[dict[str, Any]], **fields: Any
    ) -> dict[str, Any]:
        """Create an annotation as the token's user (``fields``: e.g. ``ground_truth``)."""
        return self._json(
            "POST", f"/api/tasks/{task_id}/annotations/", json={"result": result, **fields}
        )

    def delete_annotation(self, annotation_id: int) -> None:
        self._request("DELETE", f"/api/annotations/{annotation_id}/")

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
