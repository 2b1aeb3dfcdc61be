// The project page's charts and self-refresh (labelloop.serve.page renders everything else).
// The data comes from the page itself (<script type="application/json" id="page-data">), so
// the charts show exactly what the tables show; a Content-Security-Policy forbids inline
// scripts, hence this file.
(function () {
  "use strict";

  const BUSY_POLL_MS = 2000; // while a job is queued or running: progress moves every second
  const IDLE_POLL_MS = 10000; // otherwise: only to notice that training started
  const GREEN = "#1a7f37";
  const RED = "#cf222e";
  const GREY = "#8c959f";
  const HEIGHT = 240;

  const node = document.getElementById("page-data");
  if (!node) {
    return;
  }
  const data = JSON.parse(node.textContent);
  const charts = [];

  function chart(id, options, columns) {
    const el = document.getElementById(id);
    if (!el) {
      return;
    }
    const opts = Object.assign({ width: el.clientWidth, height: HEIGHT }, options);
    charts.push([el, new uPlot(opts, columns, el)]);
  }

  // uPlot stretches a single time to years and puts the first and last dots on the edges:
  // 8 % of the span around the versions, and at least 10 s (no sub-second ticks).
  function timeRange(times) {
    const first = times[0];
    const last = times[times.length - 1];
    const pad = Math.max((last - first) * 0.08, 10);
    return () => [first - pad, last + pad];
  }

  function fromZero(u, min, max) {
    return [0, Math.max(1, Math.ceil(max * 1.15))];
  }

  // Promoted versions are a line of filled green dots; rejected ones hollow red rings, alone.
  function versionSeries() {
    return [
      {},
      {
        label: "promoted",
        stroke: GREEN,
        width: 2,
        spanGaps: true,
        points: { show: true, size: 8, fill: GREEN },
      },
      {
        label: "rejected",
        stroke: RED,
        paths: () => null,
        points: { show: true, size: 11, width: 2, fill: "#fff" },
      },
    ];
  }

  function drawVersionCharts(versions) {
    const rows = versions.filter((v) => v.t !== null).sort((a, b) => a.t - b.t);
    if (!rows.length) {
      return;
    }
    const t = rows.map((v) => v.t);
    const split = (key, promoted) => rows.map((v) => (v.promoted === promoted ? v[key] : null));
    const f1 = versionSeries();
    f1.push({
      label: "the model it had to beat (same items)",
      stroke: GREY,
      dash: [5, 4],
      spanGaps: true,
      points: { show: true, size: 5, fill: GREY },
    });
    chart(
      "chart-f1",
      {
        series: f1,
        scales: { x: { time: true, range: timeRange(t) }, y: { range: [0, 1] } },
        axes: [{}, { label: "held-out macro-F1", size: 55 }],
      },
      [t, split("candidate_f1", true), split("candidate_f1", false), rows.map((v) => v.current_f1)]
    );
    chart(
      "chart-labels",
      {
        series: versionSeries(),
        scales: { x: { time: true, range: timeRange(t) }, y: { range: fromZero } },
        axes: [{}, { label: "labels used", size: 55 }],
      },
      [t, split("n_labelled", true), split("n_labelled", false)]
    );
  }

  // uPlot shares one x array between series: every class's (recall, precision) points go into
  // one sorted array, each series null where the point is another class's; spanGaps joins them.
  function drawPrCurves(curves) {
    const names = Object.keys(curves);
    if (!names.length) {
      return;
    }
    const points = [];
    names.forEach((name, s) => {
      const c = curves[name];
      c.recall.forEach((r, k) => points.push([r, c.precision[k], s, k]));
    });
    // Recall falls along a curve's points: within a class, later points come first.
    points.sort((a, b) => a[0] - b[0] || a[2] - b[2] || b[3] - a[3]);
    const columns = [points.map((p) => p[0])];
    const series = [{}];
    names.forEach((name, s) => {
      // Hues from blue round the wheel: the first class is not the rejected versions' red.
      const colour = "hsl(" + Math.round(210 + (s * 360) / names.length) % 360 + ", 65%, 40%)";
      series.push({ label: name, stroke: colour, width: 2, spanGaps: true, points: { show: false } });
      columns.push(points.map((p) => (p[2] === s ? p[1] : null)));
    });
    chart(
      "chart-pr",
      {
        series: series,
        scales: { x: { time: false, range: [0, 1] }, y: { range: [0, 1] } },
        axes: [{ label: "recall" }, { label: "precision", size: 55 }],
      },
      columns
    );
  }

  // What a change shows on the page: served version, trainer state, progress, the last job.
  function records(kind, d) {
    const one = (id, version, trainer, job) => [
      id,
      version,
      trainer.state,
      trainer.queued,
      trainer.job ? trainer.job.progress : null,
      job ? job.id : null,
      job ? job.state : null,
    ];
    if (kind === "project") {
      return [one(d.id, d.version, d.trainer, d.jobs.length ? d.jobs[0] : null)];
    }
    return (d.projects || []).map((p) => one(p.id, p.version, p.trainer, p.last_job));
  }

  function watch(w) {
    const shown = JSON.stringify(records(w.kind, w.initial));
    const busy = records(w.kind, w.initial).some((r) => r[2] !== "idle");
    async function poll() {
      if (!document.hidden) {
        try {
          const reply = await fetch(w.url, { headers: { Accept: "application/json" } });
          if (reply.ok && JSON.stringify(records(w.kind, await reply.json())) !== shown) {
            window.location.reload();
            return;
          }
        } catch (err) {
          // The backend restarting: the next poll tries again.
        }
      }
      window.setTimeout(poll, busy ? BUSY_POLL_MS : IDLE_POLL_MS);
    }
    window.setTimeout(poll, busy ? BUSY_POLL_MS : IDLE_POLL_MS);
  }

  if (data.versions) {
    drawVersionCharts(data.versions);
  }
  if (data.pr_curves) {
    drawPrCurves(data.pr_curves);
  }
  if (data.watch) {
    watch(data.watch);
  }

  let resizing = null;
  window.addEventListener("resize", () => {
    window.clearTimeout(resizing);
    resizing = window.setTimeout(() => {
      charts.forEach(([el, u]) => u.setSize({ width: el.clientWidth, height: HEIGHT }));
    }, 100);
  });
})();
