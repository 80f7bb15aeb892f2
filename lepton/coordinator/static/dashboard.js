// Lepton dashboard: polls the coordinator's JSON feed and draws the page. No libraries, no network
// access beyond the coordinator itself; charts are drawn on <canvas>. The server downsamples every
// curve (at most a few hundred points), so drawing stays cheap however long the run is.
"use strict";

(function () {
  const POLL_MS = 1000;
  const POLL_FINAL_MS = 5000;
  const FINAL = new Set(["completed", "failed", "stopped"]);
  const COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777"];
  const BAD_EVENTS = new Set(["worker_lost", "failed", "stopped", "stop_requested", "regroup", "waiting",
                              "divergence", "diverged", "nonfinite", "skipped_step", "early_stop"]);
  const GOOD_EVENTS = new Set(["recovered", "completed", "generation", "worker_adopted"]);

  // the token came in the query string once; the server answered with a cookie: hide it from the bar
  if (new URLSearchParams(location.search).has("token")) {
    history.replaceState(null, "", location.pathname);
  }

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "-";
    if (typeof v !== "number") return String(v);
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(2) + "M";
    if (a >= 1e4) return Math.round(v).toLocaleString("en-US");
    if (Number.isInteger(v)) return String(v);
    return Number(v.toPrecision(digits || 4)).toString();
  }

  function fmtDuration(s) {
    if (s === null || s === undefined || !isFinite(s)) return "-";
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
    if (m) return `${m}m ${String(sec).padStart(2, "0")}s`;
    return `${sec}s`;
  }

  function fmtTime(t) {
    const d = new Date(t * 1000);
    const time = d.toLocaleTimeString("en-GB", { hour12: false });
    const today = new Date().toDateString() === d.toDateString();
    return today ? time : `${d.toLocaleDateString("en-CA")} ${time}`;
  }

  // --- charts -------------------------------------------------------------------------------------
  function niceStep(range, count) {
    const raw = range / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const norm = raw / mag;
    const nice = norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10;   // at most `count` steps
    return nice * mag;
  }

  function ticks(min, max, count) {
    const step = niceStep(max - min, count);
    const out = [];
    for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) {
      out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    }
    return out;
  }

  class Chart {
    constructor(id, title) {
      this.id = id;
      this.series = [];
      this.xHint = 0;
      this.hoverX = null;
      this.title = el("span", { class: "chart-title", text: title });
      this.legend = el("span", { class: "legend" });
      this.count = el("span", { class: "count" });
      this.canvas = el("canvas", { role: "img", "aria-label": title });
      this.fig = el("figure", { class: "chart", "data-chart": id, "data-points": "0" },
        el("figcaption", {}, this.title, this.legend, this.count), this.canvas);
      this.canvas.addEventListener("mousemove", (e) => { this.hoverX = e.offsetX; this.draw(); });
      this.canvas.addEventListener("mouseleave", () => { this.hoverX = null; hideTooltip(); this.draw(); });
    }

    update(series, xHint) {
      this.series = series;
      this.xHint = xHint || 0;
      const total = series.reduce((n, s) => n + s.points.length, 0);
      this.fig.dataset.points = String(total);
      const raw = series.reduce((n, s) => n + (s.raw || 0), 0);
      this.count.textContent = raw > total ? `${total} of ${fmt(raw)} pts` : `${total} pts`;
      this.legend.replaceChildren(...series.map((s) => {
        const last = s.points.length ? s.points[s.points.length - 1][1] : null;
        const sw = el("i", { class: "swatch" });
        sw.style.background = s.color;
        return el("span", { class: "item" }, sw, `${s.label} ${fmt(last)}`);
      }));
      this.draw();
    }

    draw() {
      const c = this.canvas;
      const w = c.clientWidth, h = c.clientHeight;
      if (!w || !h) return;
      const dpr = window.devicePixelRatio || 1;
      if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
        c.width = Math.round(w * dpr);
        c.height = Math.round(h * dpr);
      }
      const ctx = c.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, w, h);
      const pts = this.series.flatMap((s) => s.points);
      const m = { l: 58, r: 16, t: 10, b: 28 };
      const pw = w - m.l - m.r, ph = h - m.t - m.b;
      ctx.font = "11px system-ui, -apple-system, 'Segoe UI', sans-serif";
      if (!pts.length) {
        ctx.fillStyle = "#6b7280";
        ctx.textAlign = "center";
        ctx.fillText("waiting for data…", w / 2, h / 2);
        return;
      }
      let x0 = Math.min(0, ...pts.map((p) => p[0]));
      let x1 = Math.max(this.xHint, ...pts.map((p) => p[0]));
      if (x1 <= x0) x1 = x0 + 1;
      let y0 = Math.min(...pts.map((p) => p[1]));
      let y1 = Math.max(...pts.map((p) => p[1]));
      if (y1 - y0 < 1e-12) {
        const pad = Math.abs(y0) * 0.1 || 1;
        y0 -= pad; y1 += pad;
      } else {
        const pad = (y1 - y0) * 0.06;
        y0 -= pad; y1 += pad;
      }
      const X = (x) => m.l + ((x - x0) / (x1 - x0)) * pw;
      const Y = (y) => m.t + (1 - (y - y0) / (y1 - y0)) * ph;

      // grid and axes
      ctx.strokeStyle = "#e5e7eb";
      ctx.fillStyle = "#6b7280";
      ctx.lineWidth = 1;
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      for (const t of ticks(y0, y1, Math.max(2, Math.floor(ph / 30)))) {
        const y = Math.round(Y(t)) + 0.5;
        ctx.beginPath(); ctx.moveTo(m.l, y); ctx.lineTo(m.l + pw, y); ctx.stroke();
        ctx.fillText(fmt(t, 3), m.l - 6, y);
      }
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      for (const t of ticks(x0, x1, Math.max(2, Math.floor(pw / 80)))) {
        const x = Math.round(X(t)) + 0.5;
        ctx.beginPath(); ctx.moveTo(x, m.t); ctx.lineTo(x, m.t + ph); ctx.stroke();
        const label = fmt(t, 4), half = ctx.measureText(label).width / 2;
        ctx.fillText(label, Math.min(x, w - half - 2), m.t + ph + 6);
      }
      ctx.strokeStyle = "#9ca3af";
      ctx.strokeRect(m.l + 0.5, m.t + 0.5, pw, ph);
      ctx.textAlign = "right";
      ctx.textBaseline = "bottom";
      ctx.fillText("step", m.l + pw, h);

      // curves
      ctx.save();
      ctx.beginPath(); ctx.rect(m.l, m.t, pw, ph); ctx.clip();
      for (const s of this.series) {
        if (!s.points.length) continue;
        ctx.strokeStyle = s.color;
        ctx.fillStyle = s.color;
        ctx.lineWidth = 2;
        ctx.lineJoin = "round";
        ctx.beginPath();
        s.points.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
        ctx.stroke();
        const dots = s.markers && s.points.length <= 60 ? s.points : [s.points[s.points.length - 1]];
        for (const p of dots) {
          ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 3, 0, 2 * Math.PI); ctx.fill();
        }
      }
      ctx.restore();

      // hover: the nearest logged step of each curve
      if (this.hoverX !== null && this.hoverX >= m.l && this.hoverX <= m.l + pw) {
        const xv = x0 + ((this.hoverX - m.l) / pw) * (x1 - x0);
        const rows = [];
        let snap = null;
        for (const s of this.series) {
          let best = null;
          for (const p of s.points) if (!best || Math.abs(p[0] - xv) < Math.abs(best[0] - xv)) best = p;
          if (!best) continue;
          if (snap === null || Math.abs(best[0] - xv) < Math.abs(snap - xv)) snap = best[0];
          rows.push([s, best]);
          ctx.fillStyle = s.color;
          ctx.beginPath(); ctx.arc(X(best[0]), Y(best[1]), 4.5, 0, 2 * Math.PI); ctx.fill();
        }
        if (snap !== null) {
          ctx.strokeStyle = "rgba(17,24,39,0.35)";
          ctx.setLineDash([4, 3]);
          ctx.beginPath(); ctx.moveTo(X(snap) + 0.5, m.t); ctx.lineTo(X(snap) + 0.5, m.t + ph); ctx.stroke();
          ctx.setLineDash([]);
          const r = this.canvas.getBoundingClientRect();
          showTooltip(r.left + X(snap), r.top + m.t, rows);
        }
      }
    }
  }

  function showTooltip(x, y, rows) {
    const tip = $("tooltip");
    tip.replaceChildren(...rows.map(([s, p]) => {
      const sw = el("i", { class: "swatch" });
      sw.style.background = s.color;
      return el("div", {}, sw, `${s.label}: ${fmt(p[1], 5)} @ step ${fmt(Math.round(p[0]))}`);
    }));
    tip.hidden = false;
    const left = Math.min(window.innerWidth - tip.offsetWidth - 8, x + 12);
    tip.style.left = `${left + window.scrollX}px`;
    tip.style.top = `${y + window.scrollY}px`;
  }

  function hideTooltip() { $("tooltip").hidden = true; }

  const charts = new Map();

  function chartFor(id, title) {
    let c = charts.get(id);
    if (!c) {
      c = new Chart(id, title);
      charts.set(id, c);
      placeCharts();
    }
    return c;
  }

  function chartOrder(id) {
    if (id === "loss") return [0, ""];
    if (id === "lr") return [3, ""];
    if (id === "speed") return [4, ""];
    if (id === "val/accuracy") return [1, ""];
    return [2, id];
  }

  function placeCharts() {
    const box = $("charts");
    const ordered = [...charts.values()].sort((a, b) => {
      const [ka, na] = chartOrder(a.id), [kb, nb] = chartOrder(b.id);
      return ka - kb || na.localeCompare(nb);
    });
    box.replaceChildren(...ordered.map((c) => c.fig));
  }

  const LABELS = { accuracy: "accuracy", f1: "F1 (macro)", precision: "precision (macro)", recall: "recall (macro)",
                   roc_auc: "ROC-AUC", mse: "MSE", mae: "MAE", r2: "R²" };

  function renderHistory(h, st) {
    const series = h.series || {};
    const raw = h.raw_points || {};
    const xHint = (st && st.total_steps) || 0;
    const mk = (name, label, i, markers) => ({ name, label, color: COLORS[i % COLORS.length], markers,
                                               points: series[name] || [], raw: raw[name] || 0 });
    const names = Object.keys(series);
    if (names.length) $("charts-empty")?.remove();
    if (series["train/loss"] || series["val/loss"]) {
      const list = [];
      if (series["train/loss"]) list.push(mk("train/loss", "train", 0, false));
      if (series["val/loss"]) list.push(mk("val/loss", "validation", 1, true));
      chartFor("loss", "Loss").update(list, xHint);
    }
    let i = 2;
    for (const name of names.sort()) {
      if (!name.startsWith("val/") || name === "val/loss") continue;
      const metric = name.slice(4);
      chartFor(name, `Validation ${LABELS[metric] || metric}`).update([mk(name, "validation", i++, true)], xHint);
    }
    if (series["train/lr"]) {
      chartFor("lr", "Learning rate").update([mk("train/lr", "lr", 6, false)], xHint);
    }
    if (series["train/samples_per_s"]) {
      chartFor("speed", "Throughput (samples/s)").update([mk("train/samples_per_s", "samples/s", 5, false)], xHint);
    }
    $("curves-hint").textContent = `server-side downsampled to ≤ ${h.max_points} points per curve`;
  }

  // --- tables ---------------------------------------------------------------------------------------
  function renderWorkers(workers) {
    const body = $("workers").tBodies[0];
    const rows = workers.map((w) => {
      const pill = el("span", { class: `pill state-${w.state}`, text: w.state });
      const share = w.share_fraction === null || w.share_fraction === undefined ? "-"
        : `${(w.share_fraction * 100).toFixed(1)}%`;
      const beat = w.state === "lost" || w.state === "left" || w.state === "finished"
        ? `${fmt(w.last_seen_s, 3)} s ago` : `${fmt(w.last_seen_s, 2)} s ago`;
      return el("tr", { class: `row-${w.state}`, "data-worker": w.worker_id },
        el("td", { class: "mono", text: w.worker_id }),
        el("td", { text: w.host }),
        el("td", { text: w.device || "-" }),
        el("td", { class: "state" }, pill),
        el("td", { class: "num", text: w.rank === null || w.rank === undefined ? "-" : String(w.rank) }),
        el("td", { class: "num", text: fmt(w.step) }),
        el("td", { class: "num", text: fmt(w.samples_per_s) }),
        el("td", { class: "num", text: share }),
        el("td", { class: "num", text: beat }));
    });
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { colspan: "9", class: "empty", text: "no worker has joined yet" })));
    }
    body.replaceChildren(...rows);
  }

  function eventClass(kind) {
    if (BAD_EVENTS.has(kind)) return "bad";
    if (GOOD_EVENTS.has(kind)) return "good";
    return "info";
  }

  function renderEvents(events, total) {
    const body = $("events").tBodies[0];
    const rows = events.slice().reverse().map((e) =>
      el("tr", { "data-kind": e.kind },
        el("td", { class: "mono nowrap", text: fmtTime(e.time) }),
        el("td", { class: "nowrap" }, el("span", { class: `pill ev-${eventClass(e.kind)}`, text: e.kind })),
        el("td", { text: e.reason || "" })));
    body.replaceChildren(...rows);
    $("events-hint").textContent = total > events.length ? `latest ${events.length} of ${total}, newest first`
      : `${total}, newest first`;
  }

  function renderSummary(summary) {
    const panel = $("summary-panel");
    if (!summary) { panel.hidden = true; return; }
    const splits = ["train", "val", "test"].filter((s) => summary[s] && summary[s].count);
    const names = [];
    for (const s of splits) for (const k of Object.keys(summary[s])) {
      if (k !== "count" && typeof summary[s][k] === "number" && !names.includes(k)) names.push(k);
    }
    const table = $("summary");
    const head = el("tr", {}, el("th", { text: "metric" }), ...splits.map((s) => el("th", { class: "num", text: s })));
    const rows = names.map((n) => el("tr", {}, el("td", { text: LABELS[n] || n }),
      ...splits.map((s) => el("td", { class: "num", text: fmt(summary[s][n], 5) }))));
    const info = ["steps", "epochs", "workers", "samples_per_s", "wall_s"].filter((k) => summary[k] !== undefined)
      .map((k) => `${k.replace(/_/g, " ")} ${fmt(summary[k])}`).join(" · ");
    table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows),
      el("caption", { text: info }));
    panel.hidden = false;
  }

  let lastJob = null;
  const progressLog = [];        // [ms, step] as seen by this page: the ETA uses the wall-clock pace

  function eta(st) {
    const now = Date.now();
    if (progressLog.length && st.step < progressLog[progressLog.length - 1][1]) progressLog.length = 0;
    progressLog.push([now, st.step]);
    while (progressLog.length > 2 && now - progressLog[0][0] > 60000) progressLog.shift();
    const [t0, s0] = progressLog[0];
    if (!st.total_steps || now - t0 < 3000 || st.step <= s0) return null;
    return ((st.total_steps - st.step) * (now - t0)) / 1000 / (st.step - s0);
  }

  function renderState(st) {
    document.title = `${st.name}: ${st.status} · Lepton`;
    $("job-name").textContent = st.name;
    const badge = $("status");
    badge.textContent = st.status;
    badge.dataset.status = st.status;
    const total = st.total_steps;
    $("kpi-step").textContent = total ? `${fmt(st.step)} / ${fmt(total)}` : fmt(st.step);
    $("kpi-epoch").textContent = `${fmt(st.epoch)} / ${fmt(st.epochs)}`;
    $("kpi-loss").textContent = fmt(st.loss, 4);
    $("kpi-speed").textContent = fmt(st.samples_per_s, 4);
    const live = st.workers.filter((w) => ["training", "finished", "paused", "standby"].includes(w.state)).length;
    const lost = st.workers.filter((w) => w.state === "lost").length;
    $("kpi-workers").textContent = `${live} / ${st.target_workers}` + (lost ? ` (${lost} lost)` : "");
    $("kpi-generation").textContent = fmt(st.generation);
    $("kpi-eta").textContent = FINAL.has(st.status) ? "-" : fmtDuration(eta(st));
    $("progress-bar").style.width = total ? `${Math.min(100, (100 * st.step) / total)}%` : "0%";
    $("progress-bar").dataset.status = st.status;
    $("reason").textContent = st.reason || "";
    renderWorkers(st.workers || []);
    renderEvents(st.events || [], st.events_total || 0);
    renderSummary(st.summary && st.summary.status ? st.summary : null);
    if (st.job_yaml !== lastJob) {
      lastJob = st.job_yaml;
      $("job").textContent = st.job_yaml;
    }
    $("run-dir").textContent = `run directory: ${st.run_dir}`;
  }

  // --- polling --------------------------------------------------------------------------------------
  let lastStatus = null;

  async function get(path) {
    const r = await fetch(path, { credentials: "same-origin", cache: "no-store",
                                  headers: { Accept: "application/json" } });
    if (r.status === 401) throw Object.assign(new Error("token refused"), { denied: true });
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    return r.json();
  }

  function setConn(state, text) {
    const c = $("conn");
    c.dataset.state = state;
    c.textContent = text;
  }

  async function poll() {
    try {
      const [st, h] = await Promise.all([get("dashboard/api/state"), get("dashboard/api/history")]);
      lastStatus = st.status;
      renderState(st);
      renderHistory(h, st);
      setConn("live", `live · updated ${new Date().toLocaleTimeString("en-GB", { hour12: false })}`);
    } catch (e) {
      if (e.denied) {
        setConn("denied", "token refused (401): open the dashboard URL that lepton printed (…/dashboard?token=…)");
      } else if (lastStatus && FINAL.has(lastStatus)) {
        setConn("gone", `coordinator stopped (job ${lastStatus}); this page shows its last state`);
      } else {
        setConn("down", "coordinator unreachable, retrying…");
      }
    }
    setTimeout(poll, lastStatus && FINAL.has(lastStatus) ? POLL_FINAL_MS : POLL_MS);
  }

  let resizePending = false;
  window.addEventListener("resize", () => {
    if (resizePending) return;
    resizePending = true;
    requestAnimationFrame(() => { resizePending = false; for (const c of charts.values()) c.draw(); });
  });

  poll();
})();
