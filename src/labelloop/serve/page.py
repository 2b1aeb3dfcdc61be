"""The project page: `GET /ui` lists every project, `GET /ui/projects/{id}` shows one.

Plain HTML rendered here from the dicts `/status` serves (labelloop.serve.status), so the page,
the JSON and `labelloop status` never disagree. Every value goes through `html.escape`; the
charts are drawn by uPlot, vendored in static/ (docs/page.md), from the page's own data, and a
Content-Security-Policy allows no script but those files. The routes are added to the app, so
its basic auth guards them like every other route.
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response

from labelloop.loop.ledger import AnnotationLedger
from labelloop.runtime.projects import ProjectModels
from labelloop.serve.status import overview, project_detail
from labelloop.store import ModelStore

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# The only files /ui/static serves: a request's path is looked up here, never joined to a folder.
_STATIC_FILES = {
    "uplot/uPlot.iife.min.js": "text/javascript",
    "uplot/uPlot.min.css": "text/css",
    "page.js": "text/javascript",
    "page.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
# Same bound as the ledger's integer ids (SQLite's signed 64 bits).
_PROJECT_ID = re.compile(r"[1-9][0-9]{0,17}")
_REPORT = "report.md"
_PR_PNG = "pr_curves.png"
_NONE = "—"


# -- formatting ------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return _NONE if value is None else html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _NONE
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _when(epoch: Any) -> str:
    if not isinstance(epoch, int | float):
        return _NONE
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return _NONE
    if value < 1:
        return "<1 s"
    minutes, seconds = divmod(round(value), 60)
    if minutes < 1:
        return f"{seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s"


def _epoch(created_at: Any) -> float | None:
    """A manifest's ISO `created_at` as Unix seconds (what the charts' time axis takes)."""
    try:
        stamp = datetime.fromisoformat(str(created_at))
    except ValueError:
        return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def _state(state: Any) -> str:
    text = _e(state)
    return f'<span class="tag state-{text}">{text}</span>'


def _trainer(trainer: dict[str, Any]) -> str:
    """idle, queued (how many) or running: which job, its progress, elapsed time and ETA."""
    state = trainer.get("state")
    queued = trainer.get("queued") or 0
    if state == "queued":
        return f"{_state(state)} {_e(queued)} job{'s' if queued != 1 else ''} waiting"
    if state != "running":
        return _state(state)
    job = trainer.get("job") or {}
    eta = trainer.get("eta_s")
    more = f" · {_e(queued)} more queued" if queued else ""
    return (
        f"{_state(state)} {_e(job.get('kind'))} update ({_e(job.get('trigger'))})"
        f" · {_e(job.get('progress') or 'starting')} · {_seconds(trainer.get('elapsed_s'))}"
        f" elapsed · ETA {_seconds(eta) if eta is not None else 'unknown'}{more}"
    )


def _table(headers: list[str], rows: list[list[str]], *, classes: dict[int, str]) -> str:
    """An HTML table of cells that are already HTML (escaped by their makers); `classes` gives
    some columns a CSS class (num: right-aligned figures)."""

    def cell(tag: str, i: int, content: str) -> str:
        css = classes.get(i)
        return f'<{tag} class="{css}">{content}</{tag}>' if css else f"<{tag}>{content}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _nums(*columns: int) -> dict[int, str]:
    return dict.fromkeys(columns, "num")


def _json_for_script(payload: Any) -> str:
    # Inside <script> only "</" could end the element early; \u escapes keep the JSON equal.
    text = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _document(
    title: str, crumbs: str, body: str, *, data: Any = None, status_code: int = 200
) -> HTMLResponse:
    script = (
        f'<script type="application/json" id="page-data">{_json_for_script(data)}</script>'
        '<script src="/ui/static/uplot/uPlot.iife.min.js"></script>'
        '<script src="/ui/static/page.js"></script>'
        if data is not None
        else ""
    )
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} · labelloop</title>"
        '<link rel="icon" href="/ui/static/favicon.svg" type="image/svg+xml">'
        '<link rel="stylesheet" href="/ui/static/uplot/uPlot.min.css">'
        '<link rel="stylesheet" href="/ui/static/page.css">'
        '</head><body><header class="top"><a class="brand" href="/ui">labelloop</a>'
        f'<span class="crumb">{crumbs}</span></header>'
        f"<main>{body}</main>{script}</body></html>"
    )
    return HTMLResponse(page, status_code=status_code, headers=_HEADERS)


def _not_found(message: str) -> HTMLResponse:
    body = f'<h1>Not found</h1><p>{_e(message)}</p><p><a href="/ui">All projects</a></p>'
    return _document("Not found", "", body, status_code=404)


def _version_file(store: ModelStore, version: str, name: str) -> Path | None:
    """`versions/<version>/evaluation/<name>` when `version` is one the store lists: a name
    from a request is only compared with those, so `..` or a slash never reaches a path."""
    if version not in store.versions():
        return None
    path = store.versions_dir / version / "evaluation" / name
    return path if path.is_file() else None


def _reason(text: Any, *, bad: bool) -> str:
    """A gate's reason or a job's error; a rejection's or a failure's stands out."""
    if not text:
        return ""
    return f'<span class="bad">{_e(text)}</span>' if bad else _e(text)


def _summary(items: list[tuple[str, str]]) -> str:
    cells = "".join(
        f'<div><span class="label">{_e(label)}</span><span class="value">{value}</span></div>'
        for label, value in items
    )
    return f'<div class="summary">{cells}</div>'


# -- the overview ----------------------------------------------------------------------------


def _overview_body(listing: dict[str, Any], base_report: bool) -> str:
    projects = listing["projects"]
    base = listing["base_version"]
    base_line = (
        f'<p class="meta">Base model: <code>{_e(base)}</code>'
        + (
            f' · <a href="/ui/base/versions/{_e(base)}/report">evaluation report</a>'
            if base_report
            else ""
        )
        + " · projects without a lineage of their own are served by it</p>"
        if base
        else '<p class="meta">No base model: every project starts cold.</p>'
    )
    if not projects:
        return (
            f"<h1>Projects</h1>{base_line}<p>No project yet: connect one to this backend in "
            "Label Studio (Settings &gt; Model), and it appears here.</p>"
        )
    unlabelled = any("unlabelled" in p["counts"] for p in projects)
    headers = ["Project", "Served version", "Labelled", "Skipped"]
    headers += ["Unlabelled"] if unlabelled else []
    headers += ["Trainer", "Last job"]
    rows = []
    for p in projects:
        counts = p["counts"]
        lineage = (
            '<span class="tag good">own lineage</span>'
            if p["own_lineage"]
            else '<span class="tag">base model</span>'
        )
        job = p["last_job"]
        last = _NONE
        if job:
            at = _when(job["finished_at"] or job["requested_at"])
            last = f"{_e(job['kind'])} {_state(job['state'])} {at}"
        row = [
            f'<a href="/ui/projects/{_e(p["id"])}">Project {_e(p["id"])}</a>',
            f"<code>{_e(p['version'])}</code> {lineage}",
            _num(counts["labelled"]),
            _num(counts["skipped"]),
        ]
        row += [_num(counts.get("unlabelled"))] if unlabelled else []
        row += [_trainer(p["trainer"]), last]
        rows.append(row)
    return (
        f"<h1>Projects</h1>{base_line}"
        + _table(headers, rows, classes=_nums(2, 3, 4) if unlabelled else _nums(2, 3))
        + '<footer>The same data as JSON: <a href="/status">/status</a>. The page reloads '
        "itself when a project's trainer or version changes.</footer>"
    )


# -- a project -------------------------------------------------------------------------------


def _versions_table(project_id: int, versions: list[dict[str, Any]]) -> str:
    rows = []
    for v in reversed(versions):  # newest first, like the jobs
        name = _e(v["version"])
        tags = ' <span class="tag good">current</span>' if v["current"] else ""
        tags += ' <span class="tag">weights pruned</span>' if v["weights_pruned"] else ""
        gate = (
            '<span class="tag good">promoted</span>'
            if v["promoted"]
            else ('<span class="tag bad">rejected</span>')
        )
        report = (
            f'<a href="/ui/projects/{project_id}/versions/{name}/report">report</a>'
            if v["has_report"]
            else ""
        )
        rows.append(
            [
                f"<code>{name}</code>{tags}",
                _when(_epoch(v["created_at"])),
                f"{_e(v['kind'])} ({_e(v['trigger'])})" if v["trigger"] else _e(v["kind"]),
                gate,
                _num(v["candidate_f1"]),
                _num(v["current_f1"]),
                _num(v["n_labelled"]),
                _reason(v["reason"], bad=not v["promoted"]),
                report,
            ]
        )
    return _table(
        ["Version", "Created", "Kind", "Gate", "Candidate F1", "Served F1", "Labels", "Reason", ""],
        rows,
        classes={**_nums(4, 5, 6), 7: "reason"},
    )


def _evaluation_section(
    project_id: int, served: str | None, own: bool, evaluation: dict[str, Any] | None
) -> str:
    if served is None:
        return "<h2>Evaluation</h2><p>No model serves this project yet.</p>"
    heading = f"<h2>Served version <code>{_e(served)}</code>: per class</h2>"
    if not evaluation:
        return heading + '<p class="note">No evaluation is stored for this version.</p>'
    per_class = evaluation.get("per_class") or {}
    rows = [
        [
            f"<code>{_e(name)}</code>",
            _num(m.get("precision")),
            _num(m.get("recall")),
            _num(m.get("f1")),
            _num(m.get("average_precision")),
            _num(m.get("support")),
        ]
        for name, m in per_class.items()
    ]
    table = (
        _table(
            ["Class", "Precision", "Recall", "F1", "AP", "Support"],
            rows,
            classes=_nums(1, 2, 3, 4, 5),
        )
        if rows
        else '<p class="note">No per-class numbers.</p>'
    )
    meta = (
        f'<p class="meta">On {_e(evaluation.get("source"))}: '
        f"<strong>{_num(evaluation.get('n_items'))}</strong> items, macro-F1 "
        f"<strong>{_num(evaluation.get('f1_macro'))}</strong></p>"
    )
    if evaluation.get("pr_curves"):
        curves = '<div class="chart wide"><div id="chart-pr"></div></div>'
    elif evaluation.get("pr_curves_png"):
        owner = f"projects/{project_id}" if own else "base"
        curves = (
            f'<img src="/ui/{owner}/versions/{_e(served)}/pr_curves.png" '
            f'alt="Precision-recall curves of {_e(served)}">'
        )
    else:
        curves = '<p class="note">No precision-recall curves are stored for this version.</p>'
    return (
        f"{heading}{meta}{table}<h2>Precision–recall curves of <code>{_e(served)}</code></h2>"
        f'<div class="pr">{curves}</div>'
    )


def _review_section(project_id: int, review: dict[str, Any] | None, ls_url: str | None) -> str:
    """The served version's labels to re-check, most confident disagreement first, each task a
    link into Label Studio when its URL is known."""
    heading = '<h2 id="review">Labels to re-check</h2>'
    if review is None:
        return heading + (
            '<p class="note">Each fast update lists the annotations its model disagrees with; '
            "the served version was not made by one. <code>labelloop review --project "
            f"{_e(project_id)}</code> ranks them now.</p>"
        )
    flags = review.get("flags") or []
    if not flags:
        why = review.get("reason")
        text = (
            f"No list: {_e(why)}."
            if why
            else "The model agrees with every annotation it can judge "
            f"({_num(review.get('n_judged'))} tasks)."
        )
        return heading + f'<p class="note">{text}</p>'
    rows = []
    for rank, flag in enumerate(flags, 1):
        task = _e(flag.get("task_id"))
        if ls_url:
            href = f"{ls_url}/projects/{project_id}/data?task={flag.get('task_id')}"
            task = f'<a href="{_e(href)}" rel="noreferrer">{task}</a>'
        rows.append(
            [
                _e(rank),
                task,
                f"<code>{_e(flag.get('control'))}</code>",
                f"<code>{_e(flag.get('label'))}</code>",
                "present" if flag.get("annotated") else "absent",
                _num(flag.get("probability")),
            ]
        )
    meta = (
        f'<p class="meta">By <code>{_e(review.get("version"))}</code>: '
        f"<strong>{_num(review.get('n_flagged'))}</strong> suspect labels among "
        f"{_num(review.get('n_judged'))} annotated tasks, each judged by a head not trained on "
        f"it; the first {len(flags)} here. <code>labelloop review --project {_e(project_id)} "
        "--push</code> shows them in Label Studio (docs/review.md).</p>"
    )
    table = _table(
        ["#", "Task", "Control", "Label", "Annotated", "Model: p(present)"],
        rows,
        classes=_nums(0, 1, 5),
    )
    return heading + meta + f'<div id="review-flags">{table}</div>'


def _jobs_table(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return '<p class="note">No job yet: annotations start one.</p>'
    rows = []
    for j in jobs:
        version = j["promoted_version"] or j["candidate_version"]
        reason = j["reason"] or (j["progress"] if j["state"] == "running" else None)
        rows.append(
            [
                _e(j["id"]),
                _e(j["kind"]),
                _e(j["trigger"]),
                _state(j["state"]),
                _when(j["requested_at"]),
                _seconds(j["duration_s"]),
                _num(j["candidate_f1"]),
                _num(j["current_f1"]),
                _num(j["n_items"]),
                f"<code>{_e(version)}</code>" if version else _NONE,
                _reason(reason, bad=j["state"] in ("rejected", "failed")),
            ]
        )
    return _table(
        [
            "#",
            "Kind",
            "Trigger",
            "State",
            "Requested",
            "Duration",
            "Candidate F1",
            "Served F1",
            "Gate items",
            "Version",
            "Reason",
        ],
        rows,
        classes={**_nums(0, 5, 6, 7, 8), 10: "reason"},
    )


def _history_table(history: list[dict[str, Any]]) -> str:
    if not history:
        return '<p class="note">The project\'s own lineage has no version in use yet.</p>'
    rows = [
        [_when(h.get("at")), f"<code>{_e(h.get('version'))}</code>", _e(h.get("reason"))]
        for h in reversed(history)
    ]
    return _table(["When", "Now current", "Why"], rows, classes={})


def _project_body(detail: dict[str, Any], base_report: bool, ls_url: str | None) -> str:
    pid = detail["id"]
    served = detail["version"]
    counts = detail["counts"]
    base = detail["base_version"]
    lineage = (
        "its own lineage" if detail["own_lineage"] else "the base model (no version of its own yet)"
    )
    base_link = (
        f' · <a href="/ui/base/versions/{_e(base)}/report">base model report</a>'
        if base and base_report
        else ""
    )
    head = (
        f"<h1>Project {_e(pid)}</h1>"
        f'<p class="meta">Served: <strong><code id="served-version">{_e(served)}</code></strong>'
        f" from {lineage} · base model <code>{_e(base)}</code>{base_link}</p>"
        + _summary(
            [
                ("Labelled", _num(counts["labelled"])),
                ("Skipped", _num(counts["skipped"])),
                ("Deleted", _num(counts["deleted"])),
                ("Training tasks", _num(counts["training_tasks"])),
            ]
        )
        + f'<p class="trainer">Trainer: {_trainer(detail["trainer"])}</p>'
    )
    versions = detail["versions"]
    if versions:
        gate = (
            '<div class="charts">'
            '<div class="chart"><h3>The gate: held-out macro-F1 per version</h3>'
            '<div id="chart-f1"></div></div>'
            '<div class="chart"><h3>Labels used per version</h3>'
            '<div id="chart-labels"></div></div></div>' + _versions_table(pid, versions)
        )
    else:
        gate = '<p class="note">No version trained for this project yet.</p>'
    return (
        head
        + f"<h2>Versions</h2>{gate}"
        + _evaluation_section(pid, served, detail["own_lineage"], detail["evaluation"])
        + _review_section(pid, detail["review"], ls_url)
        + f"<h2>Last jobs</h2>{_jobs_table(detail['jobs'])}"
        + f"<h2>History of current (promotions, rollbacks)</h2>{_history_table(detail['history'])}"
        + f'<footer>The same data as JSON: <a href="/status/projects/{_e(pid)}">'
        f"/status/projects/{_e(pid)}</a>. The page reloads itself when the trainer or the "
        "served version changes.</footer>"
    )


def _chart_data(detail: dict[str, Any]) -> dict[str, Any]:
    """What page.js draws and watches: the versions' gate numbers, the served version's PR
    curves, and the fields of /status/projects/{id} whose change reloads the page."""
    evaluation = detail["evaluation"] or {}
    return {
        "versions": [
            {
                "version": v["version"],
                "t": _epoch(v["created_at"]),
                "promoted": bool(v["promoted"]),
                "candidate_f1": v["candidate_f1"],
                "current_f1": v["current_f1"],
                "n_labelled": v["n_labelled"],
            }
            for v in detail["versions"]
        ],
        "pr_curves": evaluation.get("pr_curves") or None,
        "watch": {
            "kind": "project",
            "url": f"/status/projects/{detail['id']}",
            "initial": {
                "id": detail["id"],
                "version": detail["version"],
                "trainer": detail["trainer"],
                "jobs": detail["jobs"][:1],
            },
        },
    }


# -- routes ----------------------------------------------------------------------------------


def install_page(
    app: FastAPI,
    *,
    ledger: AnnotationLedger | None,
    models: ProjectModels,
    label_studio_url: Callable[[], str | None] = lambda: None,
) -> None:
    """Add the page's routes to `app` (after its dependencies are set: basic auth applies).
    `label_studio_url` gives Label Studio's URL as the backend knows it now (the env, else what
    /setup sent), for links to tasks."""
    base = models.base_store

    def known(ledger: AnnotationLedger, project_id: int) -> bool:
        # As /status/projects/{id}: a project that sent annotations or has a lineage.
        return project_id in ledger.projects() or project_id in models.projects()

    def has_report(store: ModelStore, version: str | None) -> bool:
        return version is not None and _version_file(store, version, _REPORT) is not None

    @app.get("/ui", include_in_schema=False)
    def ui_overview() -> HTMLResponse:
        if ledger is None:
            body = (
                "<h1>Projects</h1><p>This backend runs without an annotation ledger: it serves "
                f"the base model <code>{_e(base.current_version())}</code>, tracks no project "
                "and trains nothing.</p>"
            )
            return _document("Projects", "", body)
        listing = overview(ledger, models)
        body = _overview_body(listing, has_report(base, listing["base_version"]))
        watch = {"kind": "overview", "url": "/status", "initial": listing}
        return _document("Projects", "Projects", body, data={"watch": watch})

    @app.get("/ui/projects/{project_id}", include_in_schema=False)
    def ui_project(project_id: str) -> HTMLResponse:
        pid = int(project_id) if _PROJECT_ID.fullmatch(project_id) else None
        if pid is None:
            return _not_found(f"{project_id!r} is not a project id (a positive integer).")
        if ledger is None or not known(ledger, pid):
            return _not_found(
                f"Project {pid} is unknown here: connect it to this backend in Label Studio "
                "(Settings > Model) first."
            )
        detail = project_detail(ledger, models, pid)
        body = _project_body(detail, has_report(base, detail["base_version"]), label_studio_url())
        crumbs = f'<a href="/ui">Projects</a> / Project {_e(pid)}'
        return _document(f"Project {pid}", crumbs, body, data=_chart_data(detail))

    def version_file(store: ModelStore, version: str, name: str, what: str) -> Path | Response:
        path = _version_file(store, version, name)
        if path is None:
            return _not_found(f"No {what} for version {version!r}.")
        return path

    def project_store(project_id: str) -> ModelStore | None:
        return models.store(int(project_id)) if _PROJECT_ID.fullmatch(project_id) else None

    @app.get("/ui/projects/{project_id}/versions/{version}/report", include_in_schema=False)
    def ui_project_report(project_id: str, version: str) -> Response:
        store = project_store(project_id)
        if store is None:
            return _not_found(f"{project_id!r} is not a project id (a positive integer).")
        return _report(version_file(store, version, _REPORT, "evaluation report"))

    @app.get("/ui/base/versions/{version}/report", include_in_schema=False)
    def ui_base_report(version: str) -> Response:
        return _report(version_file(base, version, _REPORT, "evaluation report"))

    @app.get("/ui/projects/{project_id}/versions/{version}/pr_curves.png", include_in_schema=False)
    def ui_project_png(project_id: str, version: str) -> Response:
        store = project_store(project_id)
        if store is None:
            return _not_found(f"{project_id!r} is not a project id (a positive integer).")
        return _png(version_file(store, version, _PR_PNG, "PR curves image"))

    @app.get("/ui/base/versions/{version}/pr_curves.png", include_in_schema=False)
    def ui_base_png(version: str) -> Response:
        return _png(version_file(base, version, _PR_PNG, "PR curves image"))

    @app.get("/ui/static/{name:path}", include_in_schema=False)
    def ui_static(name: str) -> Response:
        media_type = _STATIC_FILES.get(name)
        if media_type is None:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_HEADERS)


def _report(found: Path | Response) -> Response:
    if isinstance(found, Response):
        return found
    try:
        text = found.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:  # a version pruned or removed since it was listed
        logger.warning("Cannot read %s: %s", found, exc)
        return _not_found(f"The evaluation report {found.parent.parent.name} had is gone.")
    return PlainTextResponse(text, headers=_HEADERS)


def _png(found: Path | Response) -> Response:
    if isinstance(found, Response):
        return found
    return FileResponse(found, media_type="image/png", headers=_HEADERS)
