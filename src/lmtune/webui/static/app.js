// The lmtune web UI: plain JavaScript over the JSON API of app.py; nothing is fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
let fields = [];          // the form's keys as /api/options describes them
let current = null;       // the run shown on the right
let pollTimer = null;
let history = [];         // the chat's messages

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(data.error || (data.detail && JSON.stringify(data.detail)) || response.statusText);
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// --- tabs ---------------------------------------------------------------------------------------
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
    document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === tab.dataset.tab));
    if (tab.dataset.tab !== "train") refreshLists();
  });
}

// --- the form -----------------------------------------------------------------------------------
function input(spec) {
  const id = "f-" + spec.key;
  if (spec.key === "dataset") {
    return el("div", {class: "datasets", id});
  }
  if (spec.kind === "bool") {
    const box = el("input", {type: "checkbox", id});
    box.checked = !!spec.default;
    return box;
  }
  if (spec.kind === "choice") {
    const select = el("select", {id});
    if (spec.default === null) select.append(el("option", {value: ""}, "(none)"));
    for (const choice of spec.choices) select.append(el("option", {value: choice}, choice));
    select.value = spec.default ?? "";
    return select;
  }
  return el("input", {id, value: spec.default ?? "", size: 18});
}

function drawDatasets(names) {
  const box = $("f-dataset");
  const chosen = new Set(datasetValue().split(",").filter(Boolean));
  box.replaceChildren();
  for (const name of names) {
    const check = el("input", {type: "checkbox", value: name, class: "ds"});
    check.checked = chosen.has(name);
    box.append(el("label", {}, check, " " + name));
  }
  const other = [...chosen].filter((n) => !names.includes(n)).join(",");
  box.append(el("input", {type: "text", id: "ds-other", placeholder: "or file paths, comma separated", value: other}));
  box.addEventListener("change", invalidatePlan);
}

function datasetValue() {
  const box = $("f-dataset");
  if (!box) return "";
  const picked = [...box.querySelectorAll("input.ds:checked")].map((c) => c.value);
  const other = $("ds-other") ? $("ds-other").value.split(",").map((s) => s.trim()).filter(Boolean) : [];
  return [...picked, ...other].join(",");
}

function showMethodFields() {
  const method = $("f-finetuning_type").value;
  for (const spec of fields) {
    const row = $("f-" + spec.key).closest(".field");
    row.hidden = !!(spec.methods && !spec.methods.includes(method));
  }
}

function formValues() {
  const values = {};
  const method = $("f-finetuning_type").value;
  for (const spec of fields) {
    if (spec.methods && !spec.methods.includes(method)) continue;
    const node = $("f-" + spec.key);
    let value;
    if (spec.key === "dataset") value = datasetValue();
    else if (spec.kind === "bool") value = node.checked;
    else value = node.value.trim();
    if (value === "") continue;
    if (spec.kind === "int" && /^-?\d+$/.test(value)) value = parseInt(value, 10);
    if (spec.kind === "float" && value !== "" && !isNaN(Number(value))) value = Number(value);
    values[spec.key] = value;
  }
  return {name: $("run-name").value.trim(), form: values, extra: $("extra").value};
}

function invalidatePlan() {
  $("start-btn").disabled = true;
  $("start-btn").title = "plan the run first";
}

async function plan() {
  $("form-error").textContent = "";
  $("plan-summary").textContent = "planning...";
  $("plan-btn").disabled = true;
  try {
    const result = await api("/api/plan", formValues());
    $("plan-summary").textContent = result.summary;
    $("plan-summary").classList.remove("muted");
    $("yaml").textContent = result.yaml;
    $("yaml-path").textContent = "will be written to " + result.config_path;
    $("start-btn").disabled = false;
    $("start-btn").title = "";
  } catch (err) {
    $("plan-summary").textContent = "";
    $("form-error").textContent = err.message;
  } finally {
    $("plan-btn").disabled = false;
  }
}

async function startRun() {
  $("form-error").textContent = "";
  try {
    const run = await api("/api/runs", formValues());
    invalidatePlan();
    await refreshLists(run.name);
    showRun(run);
    poll();
  } catch (err) {
    $("form-error").textContent = err.message;
  }
}

// --- the run on the right -----------------------------------------------------------------------
function drawLoss(records) {
  const svg = $("loss-plot");
  const key = records.some((r) => "loss" in r) ? "loss" : "reward";
  const train = records.filter((r) => key in r).map((r) => [r.step, r[key]]);
  const evals = records.filter((r) => "eval_" + key in r).map((r) => [r.step, r["eval_" + key]]);
  const all = train.concat(evals);
  const ns = "http://www.w3.org/2000/svg";
  const make = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  svg.replaceChildren();
  const [left, right, top, bottom] = [56, 620, 16, 226];
  if (!all.length) {
    make("text", {x: 320, y: 130, "text-anchor": "middle"}, "the loss curve appears with the first logged step");
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.08; y0 -= pad; y1 += pad;
  const sx = (x) => left + (x - x0) / (x1 - x0) * (right - left);
  const sy = (y) => bottom - (y - y0) / (y1 - y0) * (bottom - top);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    make("line", {x1: left, x2: right, y1: sy(y), y2: sy(y), class: "grid"});
    make("text", {x: left - 6, y: sy(y) + 4, "text-anchor": "end"}, y.toPrecision(3));
  }
  make("line", {x1: left, x2: right, y1: bottom, y2: bottom, class: "axis"});
  make("line", {x1: left, x2: left, y1: top, y2: bottom, class: "axis"});
  make("text", {x: left, y: bottom + 16, "text-anchor": "middle"}, String(Math.max(0, Math.round(x0))));
  make("text", {x: right, y: bottom + 16, "text-anchor": "middle"}, String(Math.round(x1)));
  make("text", {x: (left + right) / 2, y: bottom + 28, "text-anchor": "middle"}, "step");
  const line = (points, cls) => {
    if (!points.length) return;
    make("polyline", {points: points.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "), class: cls});
    for (const p of points) make("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, class: cls});
  };
  line(train, "loss-line");
  line(evals, "eval-line");
  make("text", {x: right, y: top + 4, "text-anchor": "end"},
       `train ${key}` + (evals.length ? ` (solid), eval ${key} (dashed)` : ""));
}

function showRun(run) {
  current = run.name;
  $("run-select").value = run.name;
  $("run-state").textContent = run.state;
  $("run-state").className = "badge " + run.state;
  const [done, total] = run.progress || [run.log.length ? run.log[run.log.length - 1].step : 0, 0];
  $("progress-bar").style.width = total ? `${100 * done / total}%` : (run.state === "finished" ? "100%" : "0");
  const last = run.log.filter((r) => "loss" in r).pop();
  $("progress-text").textContent = (total ? `step ${done} of ${total}` : "") +
    (last ? `, loss ${last.loss.toFixed(4)}` : "") +
    (run.checkpoints.length ? `; checkpoints: ${run.checkpoints.join(", ")}` : "") +
    (run.state === "failed" ? `; exit code ${run.returncode}` : "");
  $("stop-btn").disabled = run.state !== "running";
  $("resume-btn").disabled = !run.resumable;
  drawLoss(run.log);
  const png = $("loss-png");
  $("png-box").hidden = !run.plot;
  const version = `${run.name}:${run.state}:${run.log.length}`;
  if (run.plot && png.dataset.version !== version) {
    png.src = `/api/runs/${encodeURIComponent(run.name)}/plot.png?v=${encodeURIComponent(version)}`;
    png.dataset.version = version;
  }
  $("console").textContent = run.console.join("\n");
  $("yaml").textContent = run.yaml;
  $("yaml-path").textContent = run.config_path;
  $("busy").textContent = run.state === "running" ? `training ${run.name}` : "";
}

async function poll() {
  clearTimeout(pollTimer);
  if (!current) return;
  try {
    const run = await api(`/api/runs/${encodeURIComponent(current)}`);
    showRun(run);
    if (run.state === "running") pollTimer = setTimeout(poll, 1000);
    else refreshLists(current);
  } catch (err) {
    $("run-error").textContent = err.message;
  }
}

async function runAction(action) {
  $("run-error").textContent = "";
  try {
    await api(`/api/runs/${encodeURIComponent(current)}/${action}`, {});
    poll();
  } catch (err) {
    $("run-error").textContent = err.message;
  }
}

// --- lists of runs (train, chat and export selectors) ---------------------------------------------
async function refreshLists(select) {
  const {runs} = await api("/api/runs");
  const runSelect = $("run-select");
  runSelect.replaceChildren(...runs.map((r) => el("option", {value: r.name}, `${r.name} (${r.state})`)));
  if (select || current) runSelect.value = select || current;
  const chatModel = $("chat-model");
  const chosen = chatModel.value;
  chatModel.replaceChildren(el("option", {value: ""}, "base model"),
    ...runs.filter((r) => r.chat).map((r) => el("option", {value: r.name}, `run ${r.name}`)));
  chatModel.value = [...chatModel.options].some((o) => o.value === chosen) ? chosen : "";
  $("base-label").hidden = chatModel.value !== "";
  const exportRun = $("export-run");
  const exportChosen = exportRun.value;
  exportRun.replaceChildren(...runs.filter((r) => r.chat).map((r) => el("option", {value: r.name}, r.name)));
  if (exportChosen) exportRun.value = exportChosen;
  if (!$("export-dir").value && exportRun.value) $("export-dir").value = `saves/merged-${exportRun.value}`;
  const {reports} = await api("/api/compare");
  const compareSelect = $("compare-select");
  const compareChosen = compareSelect.value;
  compareSelect.replaceChildren(...reports.map((r) => el("option", {value: r}, r)));
  $("compare-hint").hidden = reports.length > 0;
  if (reports.length) {
    compareSelect.value = reports.includes(compareChosen) ? compareChosen : reports[0];
    if (compareSelect.value !== compareChosen) showCompare();
  }
}

// --- chat -----------------------------------------------------------------------------------------
function addMessage(role, text) {
  const node = el("div", {class: "msg " + role}, el("span", {class: "who"}, role === "user" ? "you" : "assistant"), text);
  $("messages").append(node);
  $("messages").scrollTop = $("messages").scrollHeight;
  return node;
}

async function send() {
  const text = $("chat-text").value.trim();
  if (!text) return;
  $("chat-error").textContent = "";
  $("chat-text").value = "";
  history.push({role: "user", content: text});
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  const answer = document.createTextNode("");
  bubble.append(answer);
  $("chat-send").disabled = true;
  const run = $("chat-model").value || null;
  const body = {messages: history, run, model: $("chat-base").value.trim() || "default",
                sample: $("chat-sample").checked, max_new_tokens: parseInt($("chat-max").value, 10) || 128};
  try {
    const response = await fetch("/api/chat", {method: "POST", headers: {"Content-Type": "application/json"},
                                               body: JSON.stringify(body)});
    if (!response.ok) throw new Error((await response.json()).error || response.statusText);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!frame.startsWith("data: ")) continue;
        const event = JSON.parse(frame.slice(6));
        if (event.text) answer.textContent += event.text;
        if (event.model) bubble.firstChild.textContent = event.model;
        if (event.error) throw new Error(event.error);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
    answer.textContent = answer.textContent.trim();
    history.push({role: "assistant", content: answer.textContent});
    bubble.classList.remove("streaming");
    bubble.classList.add("done");
  } catch (err) {
    history.pop();
    bubble.remove();
    $("chat-error").textContent = err.message;
  } finally {
    $("chat-send").disabled = false;
  }
}

// --- compare and export ------------------------------------------------------------------------------
const COLUMNS = [["name", "variant"], ["finetuning_type", "method"], ["trainable_params", "trainable params"],
  ["trainable_pct", "trainable %"], ["peak_gib", "peak memory GiB"], ["wall_s", "wall s"],
  ["train_tokens_per_second", "tokens/s"], ["final_train_loss", "final loss"], ["eval_loss", "eval loss"],
  ["score", "task score"], ["size_mb", "size MB"]];

function cell(key, value) {
  if (value === null || value === undefined) return "-";
  if (key === "score") return value.total ? `${value.hits}/${value.total}` : "-";
  if (typeof value === "number") {
    return Number.isInteger(value) ? value.toLocaleString("en") : String(Number(value.toPrecision(4)));
  }
  return String(value);
}

function compareCell(row, key) {
  if (row.status === "ok" || key === "name" || key === "finetuning_type") return cell(key, row[key]);
  return key === "trainable_params" ? "failed: " + String(row.error || "").split("\n")[0] : "";
}

async function showCompare() {
  const dir = $("compare-select").value;
  if (!dir) return;
  const report = await api(`/api/compare/report?dir=${encodeURIComponent(dir)}`);
  const table = $("compare-table");
  table.replaceChildren(el("tr", {}, ...COLUMNS.map(([, title]) => el("th", {}, title))));
  for (const row of report.variants) {
    row.peak_gib = row.peak_gpu_gib ?? row.peak_rss_gib;  // GPU memory where the run had a GPU
    table.append(el("tr", {}, ...COLUMNS.map(([key]) => el("td", {}, compareCell(row, key)))));
  }
  const png = $("compare-png");
  png.hidden = !report.plot;
  if (report.plot) png.src = `/api/compare/plot.png?dir=${encodeURIComponent(dir)}`;
}

async function exportRun() {
  $("export-error").textContent = "";
  $("export-result").textContent = "exporting...";
  $("export-btn").disabled = true;
  try {
    const result = await api("/api/export", {run: $("export-run").value, export_dir: $("export-dir").value.trim()});
    $("export-result").textContent = result.output.join("\n") + "\n" + result.export_dir + ": " + result.files.join(", ");
  } catch (err) {
    $("export-result").textContent = "";
    $("export-error").textContent = err.message;
  } finally {
    $("export-btn").disabled = false;
  }
}

// --- start -----------------------------------------------------------------------------------------
async function init() {
  const options = await api("/api/options");
  fields = options.fields;
  const box = $("fields");
  for (const spec of fields) {
    box.append(el("label", {class: "field"}, el("span", {title: spec.doc}, spec.key), input(spec)));
  }
  drawDatasets(options.datasets);
  $("f-dataset_dir").addEventListener("change", async () => {
    const {names} = await api(`/api/datasets?dataset_dir=${encodeURIComponent($("f-dataset_dir").value)}`);
    drawDatasets(names);
  });
  $("f-finetuning_type").addEventListener("change", showMethodFields);
  showMethodFields();
  for (const node of document.querySelectorAll("#train .form-col input, #train .form-col select, #train .form-col textarea")) {
    node.addEventListener("input", invalidatePlan);
    node.addEventListener("change", invalidatePlan);
  }
  $("plan-btn").addEventListener("click", plan);
  $("start-btn").addEventListener("click", startRun);
  $("stop-btn").addEventListener("click", () => runAction("stop"));
  $("resume-btn").addEventListener("click", () => runAction("resume"));
  $("run-select").addEventListener("change", () => { current = $("run-select").value; poll(); });
  $("copy-yaml").addEventListener("click", () => navigator.clipboard.writeText($("yaml").textContent));
  $("chat-send").addEventListener("click", send);
  $("chat-text").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
  $("chat-clear").addEventListener("click", () => { history = []; $("messages").replaceChildren(); });
  $("chat-model").addEventListener("change", () => { $("base-label").hidden = $("chat-model").value !== ""; });
  $("compare-select").addEventListener("change", showCompare);
  $("export-run").addEventListener("change", () => { $("export-dir").value = `saves/merged-${$("export-run").value}`; });
  $("export-btn").addEventListener("click", exportRun);
  // A name typed while the lists load is the user's: the first free run-N replaces only the default.
  $("run-name").addEventListener("input", () => { $("run-name").dataset.edited = "yes"; });
  drawLoss([]);
  await refreshLists();
  const names = options.runs.map((r) => r.name);
  let n = 1;
  while (names.includes(`run-${n}`)) n++;
  if (!$("run-name").dataset.edited) $("run-name").value = `run-${n}`;
  if (options.running || names.length) { current = options.running || names[0]; poll(); }
}

init().catch((err) => { $("form-error").textContent = err.message; });
