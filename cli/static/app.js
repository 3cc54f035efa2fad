// The tlm lab page: jobs, workers, a run's curves, log and checkpoints, compare, controls.
// Every piece of job-provided text goes into the page as text (el() below), never as HTML.
"use strict";

const TOKEN = document.querySelector('meta[name="tlm-token"]').content;
// The job kinds and states, from the server's table (tlm_worker.kinds): no kind or state is named here.
const TABLE = JSON.parse(document.querySelector('meta[name="tlm-table"]').content);
const STATES = TABLE.states;
const STALE_SECONDS = 30; // a worker heartbeats every lease/4 (at most 5 s)

// -- small helpers -------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path) {
  const r = await fetch(path, { headers: { "X-TLM-Token": TOKEN } });
  if (!r.ok) throw new Error(await r.text());
  return r.json();
}

async function post(path, body) {
  const r = await fetch(path, {
    method: "POST", body: JSON.stringify(body),
    headers: { "X-TLM-Token": TOKEN, "Content-Type": "application/json" },
  });
  const text = await r.text();
  if (!r.ok) throw new Error(text);
  return JSON.parse(text);
}

function notice(text, command = "", error = false) {
  const box = document.getElementById("notice");
  box.hidden = false;
  box.className = error ? "error" : "";
  document.getElementById("notice-text").textContent = text;
  document.getElementById("notice-command").textContent = command ? `same as: ${command}` : "";
}

async function act(promise, what) {
  try {
    const r = await promise;
    notice(what(r), r.command);
    return r;
  } catch (e) {
    notice(e.message, "", true);
  }
}

const runName = key => key.slice(key.indexOf(":") + 1);
const runLink = key => el("a", { href: "#/run/" + encodeURIComponent(key) }, runName(key));
const sweepLink = (id, text) => el("a", { href: "#/sweep/" + encodeURIComponent(id), class: "sweep" }, text);
const jobRunCell = job => (job.driven ? sweepLink(job.id, `sweep ${runName(job.run)}`)
  : job.sweep ? el("span", {}, runLink(job.run), " ", sweepLink(job.sweep.id, `(trial ${job.sweep.trial})`))
    : runLink(job.run));
const jobLink = id => el("a", { href: "#/job/" + encodeURIComponent(id) }, el("code", {}, id));
const workerLink = id => el("a", { href: "#/worker/" + encodeURIComponent(id) }, id);
// Who runs a job, each worker a link: its worker, a gang's members, or how far a gang has gathered.
const holderCell = job => ((job.members || []).length
  ? job.members.flatMap((m, i) => [i ? ", " : "", workerLink(m.worker)])
  : job.worker ? workerLink(job.worker) : job.holder);
const fmt = (x, digits = 3) => (x === null || x === undefined ? "" : Number(x).toFixed(digits));

// Stamps are the queue's time; this browser's clock may differ (set at each overview).
let clockOffset = 0;
const queueNow = () => Date.now() / 1000 + clockOffset;

function age(t) {
  if (!t) return "-";
  const s = Math.max(0, queueNow() - t);
  return s < 120 ? `${s.toFixed(0)}s` : s < 7200 ? `${(s / 60).toFixed(0)}m` : `${(s / 3600).toFixed(1)}h`;
}

function table(headers, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, headers.map(h => el("th", {}, h)))),
    el("tbody", {}, rows));
}

// -- jobs and workers -------------------------------------------------------------------

function jobActions(job) {
  const live = TABLE.claimable.concat(TABLE.active).includes(job.state);
  const out = [];
  if (live) {
    out.push(el("button", { class: "cancel", onclick: () => act(
      post(`/api/jobs/${job.id}/cancel`, { force: false }),
      r => r.ended ? `job ${job.id} removed from the queue` : `job ${job.id}: saving, then cancelled`) },
      "cancel"));
    if (job.state !== "queued") out.push(" ", el("button", { class: "force", onclick: () => act(
      post(`/api/jobs/${job.id}/cancel`, { force: true }), () => `job ${job.id}: stopping now`) },
      "force"));
  } else if (job.trainer && ["cancelled", "failed"].includes(job.state) && !job.driven) {
    out.push(el("button", { class: "resume", onclick: () => act(
      post("/api/resume", { key: job.run }), r => `queued job ${r.job} to resume ${runName(job.run)}`) },
      "resume"));
  }
  if (["failed", "cancelled", "skipped"].includes(job.state) && !job.driven) {
    out.push(" ", el("button", { class: "retry", onclick: () => act(
      post(`/api/jobs/${job.id}/retry`, {}), r => `queued job ${r.job}: ${job.kind} again`) }, "retry"));
  }
  return out;
}

function jobRow(job, selectable) {
  const p = job.progress || {};
  const val = p.val_metric !== undefined
    ? `${p.val_metric_name} ${fmt(p.val_metric, 2)}${p.val_step !== undefined ? ` @${p.val_step}` : ""}` : "";
  const eta = p.eta_seconds && job.state === "running" ? `${(p.eta_seconds / 60).toFixed(0)}m` : "";
  return el("tr", { dataset: { job: job.id } },
    selectable ? el("td", {}, el("input", { type: "checkbox", class: "pick", value: job.run })) : null,
    el("td", {}, jobLink(job.id)), el("td", {}, job.kind), el("td", { class: "run" }, jobRunCell(job)),
    el("td", { class: `state state-${job.state}` }, job.state),
    el("td", {}, holderCell(job)),
    el("td", { class: "num step" }, job.waiting || (p.phase && job.state === "running" ? p.phase
      : p.step ? `${p.step}/${p.total}` : "")),
    el("td", { class: "num" }, fmt(p.train_loss)), el("td", { class: "num" }, val),
    el("td", { class: "num" }, p.tokens_per_sec ? Math.round(p.tokens_per_sec).toLocaleString() : ""),
    el("td", { class: "num" }, eta),
    el("td", { class: "num" }, job.interruptions ? `${job.attempts}+${job.interruptions}` : job.attempts),
    el("td", { class: "num" }, age(job.created)), el("td", { class: "error" }, job.error || ""),
    el("td", {}, jobActions(job)));
}

const JOB_HEADERS = ["id", "kind", "run", "state", "worker", "step", "train loss", "val", "tok/s",
  "ETA", "tries", "age", "error", ""];

function workerTable(workers) {
  const gib = n => `${(n / 2 ** 30).toFixed(1)}`;
  return table(["worker", "host", "device", "memory in use", "labels", "slots", "load", "done", "heartbeat", "jobs"],
    workers.map(w => {
    const stale = queueNow() - w.heartbeat > STALE_SECONDS;
    const slots = w.slots ? `train ${w.slots.train} · interactive ${w.slots.interactive}` : "";
    const caps = w.capabilities || {};
    const labels = Object.entries(caps.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
    const total = w.slots ? w.slots.train + w.slots.interactive : 0;
    return el("tr", { dataset: { worker: w.id } }, el("td", {}, workerLink(w.id)), el("td", {}, w.host),
      el("td", {}, w.device + (caps.chip ? ` (${caps.chip})` : "")),
      el("td", { class: "num memory" }, caps.memory_total
        ? `${gib(caps.memory_total - caps.memory_available)} of ${gib(caps.memory_total)} GiB` : ""),
      el("td", {}, labels + (w.paused ? ` paused: ${w.paused}` : "")), el("td", {}, slots),
      el("td", { class: "num load" }, total ? `${(w.jobs || []).length}/${total}` : ""),
      el("td", { class: "num done" }, w.done ?? ""),
      el("td", { class: stale ? "stale" : "" }, age(w.heartbeat) + (stale ? " (stale)" : "")),
      el("td", {}, (w.jobs || []).length ? (w.jobs || []).flatMap((j, i) => [i ? ", " : "", jobLink(j)]) : "-"));
  }));
}

const PAGE = 100; // finished jobs per page of the jobs table

function jobsView(root) {
  const state = el("select", { id: "filter-state" }, el("option", { value: "" }, "all states"),
    STATES.map(s => el("option", { value: s }, s)));
  const kind = el("select", { id: "filter-kind" }, el("option", { value: "" }, "all kinds"),
    TABLE.kinds.map(k => el("option", { value: k.name }, k.name)));
  const worker = el("select", { id: "filter-worker" }, el("option", { value: "" }, "all workers"));
  const run = el("input", { id: "filter-run", placeholder: "run contains…" });
  const back = [];  // the cursors of the pages further back shown so far (none: the newest)
  let next = null;
  const pageInfo = el("span", { id: "page-info", class: "muted" });
  const newer = el("button", { id: "page-newer", onclick: () => { back.pop(); refresh(); } }, "newer");
  const older = el("button", { id: "page-older", onclick: () => { back.push(next); refresh(); } }, "older");
  const jobsBox = el("div", { id: "jobs" }), workersBox = el("div", { id: "workers" });
  const compare = el("button", { onclick: () => {
    const keys = [...new Set([...document.querySelectorAll("input.pick:checked")].map(c => c.value))];
    location.hash = "#/compare/" + keys.map(encodeURIComponent).join(",");
  } }, "compare selected runs");
  root.append(el("h2", {}, "Jobs"), el("div", { class: "filters" }, state, kind, worker, run, compare,
    newer, older, pageInfo), jobsBox, el("h2", {}, "Workers"), workersBox, submitForm());
  async function refresh() {
    const params = new URLSearchParams({ limit: PAGE });
    if (back.length) params.set("after", back[back.length - 1]);
    if (state.value) params.set("state", state.value);
    const data = await api("/api/overview?" + params);
    clockOffset = data.now - Date.now() / 1000;
    const needle = run.value.trim();
    const names = new Set([...data.workers.map(w => w.id), ...data.jobs.map(j => j.worker).filter(Boolean)]);
    const chosen = worker.value;
    worker.replaceChildren(el("option", { value: "" }, "all workers"),
      ...[...names].sort().map(n => el("option", { value: n, selected: n === chosen }, n)));
    const jobs = data.jobs.filter(j => (!needle || j.run.includes(needle)) && (!kind.value || j.kind === kind.value)
      && (!chosen || j.worker === chosen || (j.members || []).some(m => m.worker === chosen))).reverse();
    jobsBox.replaceChildren(table(["", ...JOB_HEADERS], jobs.map(j => jobRow(j, true))));
    next = data.next;
    pageInfo.textContent = back.length ? `finished jobs ${back.length * PAGE + 1}-${(back.length + 1) * PAGE} back`
      : "live and newest finished";
    newer.disabled = !back.length;
    older.disabled = !next;
    workersBox.replaceChildren(data.workers.length ? workerTable(data.workers)
      : el("p", { class: "muted" }, "no worker is running: start one with `tlm-worker`"));
  }
  for (const f of [state, kind, worker]) f.addEventListener("change", () => { back.length = 0; refresh(); });
  run.addEventListener("input", refresh);
  return refresh;
}

function submitForm() {
  const preset = el("select", { id: "submit-preset" }, el("option", { value: "" }, "no preset"));
  api("/api/presets").then(d => Object.keys(d.presets).forEach(
    name => preset.append(el("option", { value: name }, name))));
  const run = el("input", { id: "submit-run", placeholder: "run name", required: true });
  const priority = el("select", { id: "submit-priority" },
    ["normal", "high", "low"].map(p => el("option", { value: p }, `${p} priority`)));
  const overrides = el("textarea", { id: "submit-overrides", rows: 3,
    placeholder: "one flag per line, e.g.\nnum_iters=2000\nlearning_rate=3e-3" });
  const form = el("form", {}, el("div", { class: "row" }, preset, run, priority,
    el("button", { class: "primary", type: "submit" }, "submit training job")), overrides);
  form.addEventListener("submit", e => {
    e.preventDefault();
    const flags = {};
    for (const line of overrides.value.split("\n").map(l => l.trim()).filter(Boolean)) {
      const [k, ...v] = line.split("=");
      flags[k.trim()] = v.join("=").trim();
    }
    act(post("/api/submit", { preset: preset.value, run: run.value, overrides: flags,
      priority: priority.value }),
      r => `queued training job ${r.job}`);
  });
  return el("div", {}, el("h2", {}, "Submit"), form);
}

// -- curves -----------------------------------------------------------------------------------

// uPlot wants one x array shared by all series: the union of x values, gaps as null.
function align(series) {
  const xs = [...new Set(series.flatMap(s => s.map(p => p[0])))].sort((a, b) => a - b);
  return [xs, ...series.map(s => { const m = new Map(s); return xs.map(x => (m.has(x) ? m.get(x) : null)); })];
}

const COLORS = ["#3157d5", "#e67e22", "#1e8449", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d"];

// What every curve shows: TensorBoard's smoothing (a debiased EMA) and a log-scale option.
const VIEW = { smooth: 0, log: false };

function ema(points, weight) {
  if (!weight) return points;
  let last = 0, n = 0;
  return points.map(([x, y]) => { last = last * weight + (1 - weight) * y; n += 1;
    return [x, last / (1 - weight ** n)]; });
}

function chartControls() {
  const smooth = el("input", { id: "smooth", type: "range", min: 0, max: 0.99, step: 0.01, value: VIEW.smooth });
  const label = el("span", { id: "smooth-value" }, VIEW.smooth.toFixed(2));
  const log = el("input", { id: "log-scale", type: "checkbox", checked: VIEW.log });
  smooth.addEventListener("input", () => { VIEW.smooth = Number(smooth.value); label.textContent = VIEW.smooth.toFixed(2); update(); });
  log.addEventListener("change", () => { VIEW.log = log.checked; update(); });
  return el("div", { class: "row chart-controls" }, el("label", {}, "smoothing ", smooth, " ", label),
    el("label", {}, log, " log scale"), el("span", { class: "muted" }, " · drag to zoom, double-click to reset"));
}

const resizing = new ResizeObserver(entries => entries.forEach(e => {
  const plot = e.target.__plot;
  if (plot && Math.abs(plot.width - e.target.clientWidth) > 8) plot.setSize({ width: e.target.clientWidth, height: 260 });
}));

const LEGEND_MAX = 8; // series a chart's legend lists; past it: the emphasised in colour, the rest grey, hover names

function chart(box, title, xLabel, labels, series, dimmed = [], emphasised = [], yLabel = "loss") {
  box.replaceChildren();
  series = series.map(s => ema(s, VIEW.smooth));
  const data = align(series);
  box.dataset.points = String(series.reduce((n, s) => n + s.length, 0));
  if (!data[0].length) {
    box.append(el("p", { class: "muted" }, `${title}: no points yet`));
    return;
  }
  const many = labels.length > LEGEND_MAX;
  const hovered = el("div", { class: "muted hovered" }, many ? "hover a curve to name it" : "");
  const stroke = i => (!many ? COLORS[i % COLORS.length] + (dimmed[i] ? "55" : "")
    : emphasised.includes(i) ? COLORS[emphasised.indexOf(i) % COLORS.length] : "#9995");
  box.__plot = new uPlot({
    title, width: Math.max(320, box.clientWidth || box.parentElement.clientWidth / 2 - 30), height: 260,
    scales: { x: { time: false }, y: VIEW.log ? { distr: 3 } : {} },
    axes: [{ label: xLabel }, { label: VIEW.log ? `${yLabel} (log)` : yLabel }],
    legend: { show: !many },
    cursor: { focus: { prox: 24 } }, focus: { alpha: many ? 0.25 : 1 },
    hooks: { setSeries: [(u, i) => { if (many) hovered.textContent = i ? labels[i - 1] : "hover a curve to name it"; }] },
    series: [{}, ...labels.map((label, i) => ({ label, spanGaps: true, stroke: stroke(i),
      width: emphasised.includes(i) ? 3 : dimmed[i] || many ? 1 : 2,
      points: { show: series[i].length < 60 && !many } }))],
  }, data, box);
  if (many) box.append(hovered);
  box.dataset.legend = String(!many);
  resizing.observe(box);
}

function curves(points, x) {
  const pick = kind => points.filter(p => p.kind === kind).map(p => [x(p), p.loss]);
  return [pick("train"), pick("valid")];
}

// -- a run's page --------------------------------------------------------------------------

function runView(root, key) {
  const head = el("div"), charts = el("div", { class: "charts" });
  const byStep = el("div", { class: "chart", id: "chart-step" });
  const byTime = el("div", { class: "chart", id: "chart-time" });
  charts.append(byStep, byTime);
  // what the trainer reports beside the loss (metrics.jsonl's train records), against step
  const gauges = [["chart-lr", "learning rate", "lr"], ["chart-speed", "tokens per second", "tokens_per_sec"],
    ["chart-memory", "peak memory (GB)", "peak_memory_gb"]].map(([id, title, field]) =>
    ({ box: el("div", { class: "chart", id }), title, field }));
  const gaugeRow = el("div", { class: "charts" }, ...gauges.map(g => g.box));
  const jobsBox = el("div", { id: "run-jobs" }), config = el("div"), ckpts = el("div");
  const log = el("pre", { class: "log", id: "log" });
  const prompt = el("input", { id: "sample-prompt", placeholder: "prompt", size: 40 });
  const maxTokens = el("input", { id: "sample-max-tokens", type: "number", value: 60, min: 1, max: 2000 });
  const output = el("pre", { class: "sample", id: "sample-output" });
  const sampleForm = el("form", { class: "row" }, prompt, maxTokens,
    el("button", { class: "primary", type: "submit" }, "sample the latest checkpoint"));
  let sampleJob = null, logJob = null, logCursor = null;
  sampleForm.addEventListener("submit", async e => {
    e.preventDefault();
    output.textContent = "queued…";
    const r = await act(post("/api/sample", { key, prompt: prompt.value, max_tokens: Number(maxTokens.value) }),
      r => `queued sample job ${r.job}`);
    sampleJob = r ? r.job : null;
    refresh();
  });
  root.append(head, chartControls(), charts, gaugeRow, el("div", { class: "grid2" },
    el("div", {}, el("h2", {}, "Checkpoints"), ckpts), el("div", {}, el("h2", {}, "Configuration"), config)),
  el("h2", {}, "Sample"), sampleForm, output, el("h2", {}, "Jobs"), jobsBox, el("h2", {}, "Log"), log);

  async function refresh() {
    const run = await api("/api/run?key=" + encodeURIComponent(key));
    head.replaceChildren(el("h1", {}, runName(key)), el("p", { class: "muted" },
      key.startsWith("dir:") ? `folder ${key.slice(4)}` : "a run under the lab's save root"));
    chart(byStep, "loss against step", "step", ["train", "valid"], curves(run.points, p => p.step));
    chart(byTime, "loss against training time", "minutes", ["train", "valid"],
      curves(run.points, p => (p.elapsed || 0) / 60));
    const reported = run.points.filter(p => p.kind === "train");
    for (const g of gauges) {
      chart(g.box, g.title, "step", [g.title], [reported.filter(p => p[g.field] != null).map(p => [p.step, p[g.field]])],
        [], [], g.title);
    }
    jobsBox.replaceChildren(table(JOB_HEADERS, [...run.jobs].reverse().map(j => jobRow(j, false))));
    config.replaceChildren(
      el("p", { class: "muted", id: "config-from" }, run.config_from === "checkpoint"
        ? "the run's own configuration, as its training resolved it" : "the flags its latest job was given"),
      ...configTables(run.config),
      ...run.changes.map(c => el("p", { class: "change" }, `job ${c.job} changed `,
        Object.entries(c.changed).map(([k, [a, b]]) => `${k} ${JSON.stringify(a)} → ${JSON.stringify(b)}`).join(", "))));
    const older = run.checkpoints.length - 10;
    ckpts.replaceChildren(...[run.checkpoints.length ? table(["step", "validation loss", "identifier", "on disk"],
      run.checkpoints.slice(0, 10).map(c => el("tr", {}, el("td", { class: "num" }, c.step),
        el("td", { class: "num" }, fmt(c.loss)), el("td", {}, el("code", {}, c.identifier)),
        el("td", {}, c.on_disk === null ? "not mounted here" : c.on_disk ? "yes" : "deleted"))))
      : el("p", { class: "muted" }, "no checkpoint yet"),
    older > 0 ? el("p", { class: "muted" }, `and ${older} older`) : null].filter(Boolean));
    const trains = run.jobs.filter(j => j.trainer), shown = trains.length ? trains : run.jobs;
    const latest = shown.length ? shown[shown.length - 1].id : null; // whose log streams below
    if (latest !== logJob) { logJob = latest; logCursor = null; log.textContent = ""; }
    if (logJob) {
      const more = await api(`/api/jobs/${logJob}/log` + (logCursor ? `?after=${logCursor}` : ""));
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      if (more.lines.length) log.append(document.createTextNode(more.lines.join("\n") + "\n"));
      logCursor = more.cursor;
      if (atEnd) log.scrollTop = log.scrollHeight;
    }
    if (sampleJob) {
      const { job } = await api(`/api/jobs/${sampleJob}`);
      if (job.state === "succeeded") { output.textContent = job.result.samples[0] || "(empty)"; sampleJob = null; }
      else if (["failed", "cancelled"].includes(job.state)) { output.textContent = `${job.state}: ${job.error}`; sampleJob = null; }
      else output.textContent = `${job.state}…`;
    }
  }
  return refresh;
}

// A run's configuration: the flags the runs table compares, then every flag folded away.
function configTables(config) {
  const rows = keys => keys.map(k => el("tr", { dataset: { flag: k } }, el("td", {}, k),
    el("td", {}, JSON.stringify(config[k]))));
  const key = KEY_FLAGS.filter(k => k in config), rest = Object.keys(config).filter(k => !key.includes(k)).sort();
  return [table(["flag", "value"], rows(key)),
    rest.length ? el("details", { id: "config-rest" }, el("summary", {}, `the other ${rest.length} flags`),
      table(["flag", "value"], rows(rest))) : null].filter(Boolean);
}

// -- compare ---------------------------------------------------------------------------------

function compareView(root, keys) {
  if (!keys.length) {
    root.append(el("p", { class: "muted" }, "tick runs on the jobs page, then “compare selected runs”."));
    return async () => {};
  }
  const box = el("div", { class: "chart", id: "chart-compare" }), summary = el("div");
  root.append(el("h1", {}, "Compare runs"), chartControls(), box,
    el("h2", {}, "Final metrics and the flags that differ"), summary);
  return async () => {
    const data = await api("/api/compare?" + keys.map(k => "key=" + encodeURIComponent(k)).join("&"));
    const labels = [], series = [];
    for (const r of data.runs) {
      for (const kind of ["train", "valid", "test"]) {
        const pts = r.points.filter(p => p.kind === kind).map(p => [p.step, p.loss]);
        if (pts.length) { labels.push(`${runName(r.key)} ${kind}`); series.push(pts); }
      }
    }
    chart(box, "train, validation and test loss against step", "step", labels, series);
    const metric = f => (f ? `${fmt(f.loss)}${f.ppl ? ` (ppl ${fmt(f.ppl, 1)})` : f.bpc ? ` (${fmt(f.bpc)} bpc)` : ""} @${f.step}` : "");
    summary.replaceChildren(table(["run", "train", "valid", "test", ...data.differs],
      data.runs.map(r => el("tr", {}, el("td", {}, runLink(r.key)), el("td", {}, metric(r.final.train)),
        el("td", {}, metric(r.final.valid)), el("td", {}, metric(r.final.test)),
        data.differs.map(k => el("td", {}, r.config[k] === undefined ? "-" : JSON.stringify(r.config[k])))))));
  };
}

// -- the runs table (TensorBoard's HParams, Aim's runs) --------------------------------------------

const RUNS_PAGE = 100; // runs a page of the runs table loads (best first); "the next 100 runs" loads more
const RUN_COLUMNS = ["run", "dataset", "dim", "num_blocks", "num_heads", "context_size", "batch_size", "optimizer",
  "learning_rate", "dropout", "best_valid", "best_step", "test", "steps", "minutes", "tokens_per_sec", "state"];
const KEY_FLAGS = [...RUN_COLUMNS.slice(1), "num_iters", "time_budget", "seed"]; // first on a run's page

function runsView(root) {
  const dataset = el("select", { id: "runs-dataset" }, el("option", { value: "" }, "all datasets"));
  const needle = el("input", { id: "runs-filter", placeholder: "run contains…" });
  const box = el("div", { id: "runs-table" }), boards = el("div", { id: "leaderboards" });
  let sortKey = "best_valid", ascending = true, rows = [], next = null, pages = 1;
  const compare = el("button", { id: "runs-compare", onclick: () => {
    const keys = [...document.querySelectorAll("#runs-table input.pick:checked")].map(c => c.value);
    location.hash = "#/compare/" + keys.map(encodeURIComponent).join(",");
  } }, "compare selected runs");
  root.append(el("h1", {}, "Runs"), el("div", { class: "filters" }, dataset, needle, compare), box,
    el("h2", {}, "Leaderboard per dataset (best validation loss)"), boards);
  const cell = (k, v) => (v === null || v === undefined ? "" : typeof v === "number" && !Number.isInteger(v)
    ? (k === "tokens_per_sec" ? Math.round(v).toLocaleString() : v.toPrecision(4)) : String(v));
  function draw() {
    const shown = rows.filter(r => (!dataset.value || String(r.dataset) === dataset.value)
      && (!needle.value.trim() || r.run.includes(needle.value.trim())));
    shown.sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      const c = x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : x > y ? 1 : 0;
      return ascending ? c : -c;
    });
    const headers = RUN_COLUMNS.map(k => el("th", { class: "sortable", dataset: { key: k }, onclick: () => {
      ascending = sortKey === k ? !ascending : true; sortKey = k; draw();
    } }, k.replaceAll("_", " ") + (sortKey === k ? (ascending ? " ▲" : " ▼") : "")));
    box.dataset.count = String(shown.length);
    box.replaceChildren(el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, ""), headers)),
      el("tbody", {}, shown.map(r => el("tr", { dataset: { run: r.key } },
        el("td", {}, el("input", { type: "checkbox", class: "pick", value: r.key })),
        RUN_COLUMNS.map(k => el("td", { class: k === "run" ? "" : "num", dataset: { col: k } },
          k === "run" ? runLink(r.key) : cell(k, r[k]))))))),
    next ? el("button", { id: "runs-more", onclick: async () => { pages += 1; await load(); } },
      `the next ${RUNS_PAGE} runs (sorting and filters apply to the runs loaded)`) : "");
  }
  async function load() {  // the best runs a page at a time, as many pages as asked for so far
    const first = await api(`/api/runs?limit=${RUNS_PAGE}`);
    rows = first.runs; next = first.next;
    for (let n = 1; n < pages && next; n++) {
      const page = await api(`/api/runs?limit=${RUNS_PAGE}&after=${encodeURIComponent(next)}`);
      rows = rows.concat(page.runs); next = page.next;
    }
    draw();
    return first;
  }
  dataset.addEventListener("change", draw);
  needle.addEventListener("input", draw);
  return async () => {
    const data = await load();
    const chosen = dataset.value;
    const names = [...new Set(rows.map(r => r.dataset).filter(Boolean).map(String))].sort();
    if (names.join("\n") !== [...dataset.options].slice(1).map(o => o.value).join("\n")) {  // not under a user's click
      dataset.replaceChildren(el("option", { value: "" }, "all datasets"),
        ...names.map(d => el("option", { value: d, selected: d === chosen }, d)));
    }
    draw();
    boards.replaceChildren(...Object.entries(data.leaderboard).map(([name, best]) => el("div", { class: "board" },
      el("h3", {}, name), table(["#", "run", "best valid", "at step", "test", "minutes"], best.map((r, i) =>
        el("tr", {}, el("td", {}, i + 1), el("td", {}, runLink(r.key)), el("td", { class: "num" }, cell("", r.best_valid)),
          el("td", { class: "num" }, r.best_step ?? ""), el("td", { class: "num" }, cell("", r.test)),
          el("td", { class: "num" }, r.minutes ?? "")))))));
  };
}

// -- a sweep's page -----------------------------------------------------------------------------

// A searched flag against the best loss: choices on an axis of their own (in the order given),
// a log-uniform range on a log axis, ticks that say distinct values.
function scatter(box, name, spec, points) {
  box.replaceChildren();
  if (!points.length) { box.append(el("p", { class: "muted" }, `${name}: no trial evaluated yet`)); return; }
  const choice = spec.type === "choice";
  const xs = points.map(p => (choice ? spec.values.indexOf(p[0]) : Number(p[0])));
  const order = xs.map((_, i) => i).sort((a, b) => xs[a] - xs[b]);
  const ticks = choice ? spec.values.map((_, i) => i)
    : spec.log ? [0, 1, 2, 3, 4].map(i => spec.low * (spec.high / spec.low) ** (i / 4)) : null;
  box.__plot = new uPlot({
    title: name, width: Math.max(320, box.clientWidth - 16), height: 260,
    scales: { x: choice ? { time: false, range: [-0.5, spec.values.length - 0.5] }
      : spec.log ? { time: false, distr: 3, range: [spec.low, spec.high] } : { time: false } },
    axes: [{ label: spec.log ? `${name} (log scale)` : name, splits: ticks ? () => ticks : undefined,
      values: (u, splits) => splits.map(v => (choice ? String(spec.values[v] ?? "") : +Number(v).toPrecision(2))) },
    { label: "best loss" }],
    series: [{}, { label: "trials", stroke: COLORS[0], paths: () => null, points: { show: true, size: 7 } }],
  }, [order.map(i => xs[i]), order.map(i => points[i][1])], box);
  box.dataset.axis = choice ? "choice" : spec.log ? "log" : "linear";
  resizing.observe(box);
}

// PBT's lineage: a lane per trial along the steps; where a trial took another's checkpoint its
// lane is entered by a slanted line from the donor's lane at that step, its own line before it cut.
function lineage(box, trials, unit) {
  box.replaceChildren();
  const last = Math.max(1, ...trials.map(t => t.reached || 0)), d = last / 80;
  const at = (t, x) => {  // a lane's height at x: every series has a value at every x (null: no line)
    if (x < 0 || x > (t.reached || 0)) return null;
    for (const [step, donor] of t.copies) {
      if (x > step - 2 * d && x < step - d) return null;
      if (x >= step - d && x <= step) return donor + (t.trial - donor) * (x - step + d) / d;
    }
    return t.trial;
  };
  const xs = [...new Set(trials.flatMap(t => [0, t.reached || 0,
    ...t.copies.flatMap(([step]) => [step - 2 * d, step - 1.5 * d, step - d, step])]))].sort((a, b) => a - b);
  const lanes = trials.map(t => t.trial);
  box.__plot = new uPlot({
    title: "lineage: whose checkpoint each trial goes on from", width: Math.max(320, box.clientWidth - 16),
    height: 60 + 28 * trials.length,
    scales: { x: { time: false, range: [0, last] }, y: { range: [Math.min(...lanes) - 0.5, Math.max(...lanes) + 0.5] } },
    axes: [{ label: unit }, { label: "trial", splits: () => lanes, values: (u, splits) => splits.map(v => `trial ${v}`) }],
    series: [{}, ...trials.map((t, i) => ({ label: `trial ${t.trial}`, spanGaps: false, width: 2,
      stroke: COLORS[i % COLORS.length], points: { show: false } }))],
  }, [xs, ...trials.map(t => xs.map(x => at(t, x)))], box);
  box.dataset.copies = String(trials.reduce((n, t) => n + t.copies.length, 0));
  resizing.observe(box);
}

function sweepView(root, id) {
  const head = el("div"), controls = el("div", { class: "row" });
  const byStep = el("div", { class: "chart", id: "sweep-chart-step" });
  const byTime = el("div", { class: "chart", id: "sweep-chart-time" });
  const board = el("div", { id: "sweep-board" }), params = el("div", { class: "charts", id: "sweep-params" });
  const importance = el("div", { id: "sweep-importances" });
  const family = el("div", { class: "chart", id: "sweep-lineage" });
  let sortKey = "rank", ascending = true;
  const more = el("input", { id: "sweep-more", type: "number", value: 4, min: 1, max: 1000 });
  const bestRun = el("input", { id: "sweep-best-run", placeholder: "new run name" });
  const stop = el("button", { class: "cancel", id: "sweep-stop", onclick: () => act(post("/api/sweep/cancel", { id }),
    () => "stopping the sweep: trials save and end cancelled") }, "stop the sweep");
  const add = el("button", { id: "sweep-add", onclick: () => act(post("/api/sweep/add", { id, trials: Number(more.value) }),
    r => `the sweep now has ${r.trials} trials`) }, "add trials");
  controls.append(stop, more, add,
    bestRun, el("button", { class: "primary", id: "sweep-best", onclick: () => act(
      post("/api/sweep/best", { id, run: bestRun.value }), r => `queued job ${r.job} with the best flags`) },
    "submit the best as a run"));
  root.append(head, controls, el("div", { class: "charts" }, byStep, byTime), family, el("h2", {}, "Leaderboard"), board,
    el("h2", {}, "Each searched flag against the best loss"), params,
    el("h2", {}, "Parameter importances (Optuna)"), importance);

  return async () => {
    const data = await api("/api/sweep?id=" + encodeURIComponent(id));
    const sweep = data.sweep, names = Object.keys(sweep.params.search);
    const pbt = sweep.params.schedule === "pbt";
    head.replaceChildren(el("h1", {}, `sweep ${sweep.params.name}`), el("p", { class: "muted" },
      `${sweep.state} · ${data.trials.length} of ${sweep.params.trials} trials · `
      + (pbt ? "population based training · " : `${sweep.params.sampler} sampler · `
        + `${sweep.params.prune === "none" ? "no" : sweep.params.prune} pruning · `) + `metric ${sweep.params.metric}`));
    for (const control of [stop, more, add]) control.hidden = sweep.state !== "running";  // an ended sweep: best only
    add.hidden = more.hidden = add.hidden || pbt;  // a population is fixed
    family.hidden = !pbt;
    if (pbt) setTimeout(() => lineage(family, [...data.trials].sort((a, b) => a.trial - b.trial),
      sweep.params.budget.endsWith("m") ? "seconds of training" : "step"));
    const trials = [...data.trials].sort((a, b) => a.trial - b.trial);
    const labels = trials.map(t => `trial ${t.trial}${["pruned", "paused"].includes(t.state) ? ` (${t.state})` : ""}`);
    const pruned = trials.map(t => t.state === "pruned");
    const best = trials.map((t, i) => [t.best, i]).filter(([b]) => b !== null && b !== undefined)
      .sort((a, b) => a[0] - b[0]).slice(0, 3).map(([, i]) => i);  // the best three, in colour
    chart(byStep, "validation loss against step", "step", labels,
      trials.map(t => (data.curves[t.trial] || []).map(p => [p.step, p.loss])), pruned, best);
    chart(byTime, "validation loss against training time", "minutes", labels,
      trials.map(t => (data.curves[t.trial] || []).map(p => [(p.elapsed || 0) / 60, p.loss])), pruned, best);
    const value = (r, k) => (k in r ? r[k] : r.params[k]);
    const rows = [...data.trials].sort((a, b) => {
      const x = value(a, sortKey), y = value(b, sortKey);
      const c = x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : x > y ? 1 : 0;
      return ascending ? c : -c;
    });
    const columns = ["rank", "trial", ...names, "best", "best_step", "best_minute", "steps", "worker_time", "state"];
    const headers = columns.map(k => el("th", { class: "sortable", dataset: { key: k }, onclick: () => {
      ascending = sortKey === k ? !ascending : true; sortKey = k; update();
    } }, k.replace("_", " ") + (sortKey === k ? (ascending ? " ▲" : " ▼") : "")));
    board.replaceChildren(el("table", {}, el("thead", {}, el("tr", {}, headers, el("th", {}, ""))),
      el("tbody", {}, rows.map(r => el("tr", { dataset: { trial: r.trial }, class: r.state === "pruned" ? "dim" : "" },
        columns.map(k => el("td", { class: "num" }, typeof value(r, k) === "number" && !Number.isInteger(value(r, k))
          ? Number(value(r, k)).toPrecision(4) : value(r, k) ?? "")),
        el("td", {}, ["queued", "running", "interrupted"].includes(r.state) ? el("button", { class: "cancel",
          onclick: () => act(post(`/api/jobs/${r.job}/cancel`, {}), () => `stopping trial ${r.trial}`) }, "stop")
          : runLink("run:" + r.run)))))));
    params.replaceChildren(...names.map(n => {
      const box = el("div", { class: "chart", dataset: { flag: n } });
      const pts = data.trials.filter(r => r.best !== null && r.params[n] !== undefined).map(r => [r.params[n], r.best]);
      setTimeout(() => scatter(box, n, sweep.params.search[n], pts));
      return box;
    }));
    const imp = Object.entries(data.importances);
    importance.replaceChildren(imp.length ? table(["flag", "importance"], imp.map(([k, v]) =>
      el("tr", {}, el("td", {}, k), el("td", { class: "num" }, v.toFixed(3)))))
      : el("p", { class: "muted" }, "after two complete trials"));
  };
}

// -- a job's page and a worker's page ---------------------------------------------------------------

const stamp = t => (t ? new Date((t - clockOffset) * 1000).toLocaleString() : "-");

function jobView(root, id) {
  const head = el("div"), actions = el("div", { class: "row" }), fields = el("div", { id: "job-fields" });
  const log = el("pre", { class: "log", id: "job-log" });
  root.append(head, actions, el("div", { class: "grid2" }, el("div", {}, el("h2", {}, "Record"), fields),
    el("div", {}, el("h2", {}, "Log (its state changes, stamped)"), log)));
  let cursor = null;
  return async () => {
    const { job } = await api("/api/jobs/" + encodeURIComponent(id));
    head.replaceChildren(el("h1", {}, `${job.kind} job ${job.id}`), el("p", { class: "muted" },
      el("span", { class: `state-${job.state}` }, job.state), " · ", jobRunCell(job)));
    actions.replaceChildren(...jobActions(job));
    const row = (k, v) => el("tr", { dataset: { field: k } }, el("th", {}, k), el("td", {}, v));
    fields.replaceChildren(el("table", {}, el("tbody", {},
      row("worker", holderCell(job)),
      row("created", stamp(job.created)), row("queued", stamp(job.enqueued)), row("started", stamp(job.started)),
      row("finished", stamp(job.finished)), row("tries", job.interruptions ? `${job.attempts}+${job.interruptions}`
        : String(job.attempts)), row("priority", String(job.priority)),
      job.after ? row("after", jobLink(job.after)) : null, job.error ? row("error", job.error) : null,
      row("needs", el("code", {}, JSON.stringify(job.needs || {}))),
      row("params", el("pre", { class: "sample" }, JSON.stringify(job.params, null, 1))),
      job.result ? row("result", el("pre", { class: "sample" }, JSON.stringify(job.result, null, 1))) : null)));
    const more = await api(`/api/jobs/${encodeURIComponent(id)}/log` + (cursor ? `?after=${cursor}` : ""));
    if (more.lines.length) log.append(document.createTextNode(more.lines.join("\n") + "\n"));
    cursor = more.cursor;
  };
}

function workerView(root, id) {
  const head = el("div"), fields = el("div", { id: "worker-fields" }), jobsBox = el("div", { id: "worker-jobs" });
  root.append(head, fields, el("h2", {}, "Its jobs (live, and among the latest finished)"), jobsBox);
  return async () => {
    const data = await api("/api/overview?limit=1000");
    clockOffset = data.now - Date.now() / 1000;
    const w = data.workers.find(x => x.id === id);
    head.replaceChildren(el("h1", {}, `worker ${id}`), el("p", { class: "muted" }, w
      ? `${w.host} · pid ${w.pid} · heartbeat ${age(w.heartbeat)} ago` : "not running now (no heartbeat)"));
    fields.replaceChildren(w ? workerTable([w]) : "",
      w && w.capabilities ? el("pre", { class: "sample", id: "worker-capabilities" },
        JSON.stringify(w.capabilities, null, 1)) : "");
    const mine = data.jobs.filter(j => j.worker === id || (j.members || []).some(m => m.worker === id)).reverse();
    jobsBox.replaceChildren(mine.length ? table(JOB_HEADERS, mine.map(j => jobRow(j, false)))
      : el("p", { class: "muted" }, "none"));
  };
}

// -- routing and live updates -----------------------------------------------------------------------

let refresh = async () => {};
let pending = null;

function route() {
  const root = document.getElementById("view");
  root.replaceChildren();
  const hash = location.hash.slice(1) || "/";
  if (hash.startsWith("/run/")) refresh = runView(root, decodeURIComponent(hash.slice(5)));
  else if (hash.startsWith("/sweep/")) refresh = sweepView(root, decodeURIComponent(hash.slice(7)));
  else if (hash.startsWith("/runs")) refresh = runsView(root);
  else if (hash.startsWith("/job/")) refresh = jobView(root, decodeURIComponent(hash.slice(5)));
  else if (hash.startsWith("/worker/")) refresh = workerView(root, decodeURIComponent(hash.slice(8)));
  else if (hash.startsWith("/compare")) refresh = compareView(root,
    hash.slice(9).split(",").filter(Boolean).map(decodeURIComponent));
  else refresh = jobsView(root);
  update();
}

function update() {
  refresh().catch(e => notice(e.message, "", true));
}

function schedule() { // many changes in a burst: one refresh
  if (pending) return;
  pending = setTimeout(() => { pending = null; update(); }, 150);
}

const events = new EventSource("/api/events");
const live = document.getElementById("live");
events.addEventListener("change", schedule);
events.onopen = () => { live.textContent = "live"; live.className = "live on"; };
events.onerror = () => { live.textContent = "reconnecting…"; live.className = "live"; };
setInterval(schedule, 15000); // ages and heartbeats move without events
window.addEventListener("hashchange", route);
route();
