// FedDALE dashboard: polls GET /v1/ui/state every 2 s with the admin token and renders it.
// Text from the server is only ever set as textContent (node names and states come from nodes).
"use strict";

const TOKEN_KEY = "feddale-admin-token";
const POLL_MS = 2000;
const view = { run: null, student: null, timer: null };
const charts = {};

// ------------------------------------------------------------------ helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "onclick") node.addEventListener("click", value);
    else if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);
const num = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const clock = (t) => (t ? new Date(t * 1000).toLocaleTimeString("en-GB") : "–");
const stamp = (t) => (t ? new Date(t * 1000).toLocaleString("en-GB") : "–");

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "kB", "MB", "GB"];
  let i = 0, v = n;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
  return (i ? v.toFixed(v < 10 ? 2 : 1) : String(v)) + " " + units[i];
}

function ago(t, now) {
  if (!t) return "never";
  const s = Math.max(0, now - t);
  if (s < 60) return s.toFixed(0) + " s ago";
  if (s < 3600) return (s / 60).toFixed(0) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}

function fillBody(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
}

const dot = (alive) => el("span", { class: alive ? "dot alive" : "dot", title: alive ? "alive" : "not alive" });
const status = (s) => el("span", { class: "status " + s }, s);

// ------------------------------------------------------------------ login and polling

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function showLogin(message) {
  clearTimeout(view.timer);
  $("dashboard").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

async function poll() {
  clearTimeout(view.timer);
  const query = view.run ? "?run=" + encodeURIComponent(view.run) : "";
  let response;
  try {
    response = await fetch("/v1/ui/state" + query, { headers: { Authorization: "Bearer " + token() } });
  } catch (err) {
    $("problem").hidden = false;
    $("problem").textContent = "coordinator unreachable; retrying";
    view.timer = setTimeout(poll, POLL_MS);
    return;
  }
  if (response.status === 401 || response.status === 403) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(response.status === 403 ? "that token is not the admin token" : "invalid token");
    return;
  }
  if (!response.ok) {
    $("problem").hidden = false;
    $("problem").textContent = "coordinator answered " + response.status + "; retrying";
  } else {
    $("problem").hidden = true;
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("logout").hidden = false;
    render(await response.json());
  }
  view.timer = setTimeout(poll, POLL_MS);
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  poll();
});

$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin("logged out");
});

// ------------------------------------------------------------------ rendering

function render(state) {
  $("updated").textContent = "updated " + clock(state.now);
  renderRuns(state);
  renderClients(state);
  renderStudents(state);
  renderDetectors(state);
}

function renderRuns(state) {
  const selected = state.run ? state.run.run_id : null;
  fillBody($("runs-table"), state.runs.map((r) => el("tr", {
    class: "clickable" + (r.run_id === selected ? " selected" : ""),
    onclick: () => { view.run = r.run_id; poll(); },
  }, el("td", {}, el("code", {}, r.run_id)), el("td", {}, status(r.status)), el("td", {}, r.mode),
     el("td", { class: "num" }, r.round), el("td", {}, r.student_version || "–"), el("td", {}, stamp(r.created_at)))));
  const detail = $("run-detail");
  if (!state.run) {
    detail.replaceChildren(el("p", { class: "muted" }, "No run yet: start one with `feddale runs start`."));
    return;
  }
  const run = state.run;
  const deadline = run.round_started_at && !["published", "failed", "cancelled", "student_training"].includes(run.status)
    ? run.round_started_at + run.round_deadline_s : null;
  const fedavg = state.fedavg_adapter_bytes;
  const clients = Object.entries(run.clients);
  const rounds = Math.max(run.round, 1);
  const fedavgTotal = fedavg ? fedavg * clients.length * rounds : null;
  detail.replaceChildren(
    el("h3", {}, "Run ", el("code", {}, run.run_id), " ", el("span", { id: "run-status", class: "status " + run.status }, run.status),
       run.reason ? el("span", { class: "muted" }, "  " + run.reason) : null),
    timeline(run),
    el("div", { class: "facts" },
      fact("mode", run.mode + (run.fedavg_rounds ? ` (${run.fedavg_rounds} FedAvg rounds, then distillation)` : "")),
      fact("round", run.round ? `${run.round} (${run.round_kind})` : "–"),
      fact("deadline", deadline ? `${clock(deadline)} (in ${Math.max(0, deadline - state.now).toFixed(0)} s)` : "–"),
      fact("uploaded", `${run.uploaded.length} of ${run.expected.length} expected (min ${run.min_clients})`),
      fact("public set", `${num(run.public_count)} sessions`),
      fact("pseudo-labels", run.pseudo_labels ? `${run.pseudo_labels.normal} normal / ${run.pseudo_labels.anomalous} anomalous` : "–"),
      fact("outliers", run.outliers.length ? run.outliers.join(", ") : "none"),
      fact("student", run.student_version || "–")),
    el("table", { id: "run-clients" },
      el("thead", {}, el("tr", {}, el("th", {}), el("th", {}, "client"), el("th", {}, "shard"), el("th", {}, "uploaded rounds"),
        el("th", { class: "num" }, "bytes up"), el("th", { class: "num" }, "bytes down"))),
      el("tbody", {}, clients.map(([id, c]) => el("tr", {},
        el("td", {}, dot(c.alive)), el("td", { title: id }, c.name), el("td", { class: "num" }, c.shard ?? "–"),
        el("td", {}, c.uploaded_rounds.join(", ") || "–"), el("td", { class: "num" }, bytes(c.bytes_up)),
        el("td", { class: "num" }, bytes(c.bytes_down))))),
      el("tfoot", {},
        el("tr", {}, el("td", {}), el("th", {}, "total"), el("td", {}), el("td", {}),
          el("th", { class: "num" }, bytes(run.bytes_up)), el("th", { class: "num" }, bytes(run.bytes_down))),
        el("tr", {}, el("td", {}), el("th", {}, `FedAvg, same clients and rounds (${rounds})`), el("td", {}), el("td", {},
          fedavg ? `one teacher adapter: ${bytes(fedavg)} per client per round, each way` : "unknown for this teacher"),
          el("td", { class: "num" }, bytes(fedavgTotal)), el("td", { class: "num" }, bytes(fedavgTotal))),
        el("tr", {}, el("td", {}), el("th", {}, "uplink saved"), el("td", {}), el("td", {}),
          el("td", { class: "num", id: "uplink-ratio" },
            fedavgTotal && run.bytes_up ? (fedavgTotal / run.bytes_up).toFixed(0) + "x smaller" : "–"), el("td", {})))));
}

function fact(label, value) {
  return el("div", {}, el("span", {}, label), el("span", {}, value));
}

function timeline(run) {
  const steps = [el("li", {}, `created ${clock(run.created_at)}`)];
  for (const h of run.history) {
    steps.push(el("li", {}, `round ${h.round} ${h.kind}: ${h.participants.length} clients, closed by ${h.closed_by} ${clock(h.closed_at)}`));
  }
  const final = ["published", "failed", "cancelled"].includes(run.status);
  if (final) {
    steps.push(el("li", { class: "end-" + run.status }, `${run.status} ${clock(run.updated_at)}`));
  } else if (run.status === "student_training") {
    steps.push(el("li", { class: "current" }, `training the student since ${clock(run.updated_at)}`));
  } else if (run.round) {
    steps.push(el("li", { class: "current" }, `round ${run.round} ${run.round_kind}: ${run.uploaded.length}/${run.expected.length} uploaded`));
  }
  return el("ol", { class: "timeline" }, steps);
}

function renderClients(state) {
  fillBody($("clients-table"), state.clients.map((c) => el("tr", {},
    el("td", {}, dot(c.alive)), el("td", {}, c.name), el("td", {}, c.role), el("td", {}, el("code", {}, c.client_id)),
    el("td", { class: "num" }, c.shard ?? "–"), el("td", { class: "num" }, num(c.sessions)), el("td", {}, c.state || "–"),
    el("td", {}, c.model_version || "–"), el("td", {}, c.software || "–"),
    el("td", { title: stamp(c.last_seen) }, ago(c.last_seen, state.now)))));
}

function renderStudents(state) {
  if (!state.students.some((s) => s.version === view.student)) view.student = state.students.length ? state.students[0].version : null;
  fillBody($("students-table"), state.students.map((s) => el("tr", {
    class: "clickable" + (s.version === view.student ? " selected" : ""),
    onclick: () => { view.student = s.version; renderStudents(state); },
  }, el("td", {}, el("code", {}, s.version),
       s.promoted ? el("span", { class: "badge" }, state.pinned ? "promoted, pinned" : "promoted") : null),
     el("td", {}, el("code", {}, s.run_id)), el("td", {}, stamp(s.published_at)), el("td", {}, s.base_model),
     el("td", { class: "num" }, bytes(s.bytes)),
     el("td", {}, s.pseudo_labels ? `${s.pseudo_labels.normal} / ${s.pseudo_labels.anomalous}` : "–"),
     el("td", { title: s.decision ? s.decision.reason : "" },
        s.decision ? (s.decision.promoted ? "promoted on publishing" : "held back") : "–"),
     el("td", {}, s.served_by.join(", ") || "–"))));
  const student = state.students.find((s) => s.version === view.student);
  const hist = student && student.score_histogram;
  $("histogram-title").textContent = student ? `Score histogram of student ${student.version}` : "No student published yet";
  if (!hist) {
    dropChart("histogram");
    return;
  }
  const centres = hist.counts.map((_, i) => (hist.edges[i] + hist.edges[i + 1]) / 2);
  // Each label inside the plot, towards the other line, on a row of its own: they never overlap or clip.
  const cuts = [[hist.normal_cutoff, "#1a7f37", "normal ≥ ", -1, 1], [hist.anomalous_cutoff, "#cf222e", "anomalous ≤ ", 1, 2]];
  chart("histogram", student.version, () => ({
    width: 640, height: 220,
    scales: { x: { time: false, range: [hist.edges[0], hist.edges[hist.edges.length - 1]] } },
    axes: [{ label: "aggregated score" }, { label: "public sessions" }],
    series: [{ label: "score" }, { label: "sessions", fill: "rgba(84,174,255,.5)", stroke: "#0969da",
      paths: uPlot.paths.bars({ size: [0.95, Infinity], align: 0 }), points: { show: false } }],
    hooks: { draw: [(u) => {
      const ctx = u.ctx;
      for (const [value, colour, label, side, row] of cuts) {
        if (value === null || value === undefined) continue;
        const x = u.valToPos(value, "x", true);
        ctx.save();
        ctx.strokeStyle = colour; ctx.fillStyle = colour; ctx.lineWidth = 2 * devicePixelRatio;
        ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
        ctx.font = `${12 * devicePixelRatio}px sans-serif`;
        ctx.textAlign = side > 0 ? "left" : "right";
        ctx.fillText(label + value.toPrecision(3), x + side * 4 * devicePixelRatio, u.bbox.top + row * 14 * devicePixelRatio);
        ctx.restore();
      }
    }] },
  }), [centres, hist.counts]);
}

// Rates between consecutive heartbeats of one detector process (a restart resets its counters).
function rates(samples) {
  const out = { at: [], rate: [], latency: [], anomalies: [] };
  for (let i = 1; i < samples.length; i += 1) {
    const a = samples[i - 1], b = samples[i];
    if (a.started_at !== b.started_at || b.at <= a.at) continue;
    const requests = b.requests - a.requests, sessions = b.sessions - a.sessions;
    out.at.push(b.at);
    out.rate.push(requests / (b.at - a.at));
    out.latency.push(requests > 0 ? (1000 * (b.latency_s_sum - a.latency_s_sum)) / requests : null);
    out.anomalies.push(sessions > 0 ? (b.anomalies - a.anomalies) / sessions : null);
  }
  return out;
}

function renderDetectors(state) {
  fillBody($("detectors-table"), state.detectors.map((d) => {
    const last = d.samples[d.samples.length - 1];
    return el("tr", {}, el("td", {}, dot(d.alive)), el("td", {}, d.name), el("td", {}, d.model_version || "–"),
      el("td", { class: "num" }, last ? num(last.requests) : "–"), el("td", { class: "num" }, last ? num(last.sessions) : "–"),
      el("td", { class: "num" }, last ? `${num(last.anomalies)} (${last.sessions ? ((100 * last.anomalies) / last.sessions).toFixed(1) : "0"} %)` : "–"),
      el("td", { class: "num" }, last && last.requests ? ((1000 * last.latency_s_sum) / last.requests).toFixed(1) + " ms" : "–"));
  }));
  const per = state.detectors.map((d) => [d.name, rates(d.samples)]).filter(([, r]) => r.at.length);
  const signature = per.map(([name]) => name).join(",");
  for (const [id, key, range] of [["chart-rate", "rate", null], ["chart-latency", "latency", null], ["chart-anomalies", "anomalies", [0, 1]]]) {
    if (!per.length) { dropChart(id); continue; }
    const data = uPlot.join(per.map(([, r]) => [r.at, r[key]]));
    chart(id, signature, () => ({
      width: 420, height: 180,
      scales: range ? { y: { range } } : {},
      series: [{}, ...per.map(([name], i) => ({ label: name, stroke: ["#0969da", "#8250df", "#bf3989", "#1a7f37"][i % 4], spanGaps: true }))],
    }), data);
  }
}

// One uPlot per container: data is swapped in place while the series stay the same, rebuilt otherwise.
function chart(id, signature, options, data) {
  const existing = charts[id];
  if (existing && existing.signature === signature) {
    existing.plot.setData(data);
    return;
  }
  dropChart(id);
  charts[id] = { signature, plot: new uPlot(options(), data, $(id)) };
}

function dropChart(id) {
  if (charts[id]) { charts[id].plot.destroy(); delete charts[id]; }
}

if (token()) poll(); else showLogin();
