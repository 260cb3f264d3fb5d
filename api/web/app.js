// "Why this prediction?": pick a stored test example, see its prediction and the training examples that
// pushed towards it (proponents) and against it (opponents), with their scores. Plain DOM, no build step;
// previewElement and imageRows come from preview.js (shared with the review page).
"use strict";

const PAGE = 40;
const state = { health: null, offset: 0, selected: null, generation: 0 };
const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value || localStorage.getItem("influence-api-key") || "";
  if (key) h["X-API-Key"] = key;
  return h;
}

async function call(path, body) {
  const init = body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const res = await fetch(path, init);
  const data = await res.json();
  if (!res.ok) throw new Error(`${res.status} ${data.error || ""}: ${data.detail || JSON.stringify(data)}`);
  return data;
}

function showError(err) {
  $("error").textContent = String(err.message || err);
  $("error").hidden = false;
}

function card(preview, lines, cls, size = 64) {
  const div = document.createElement("div");
  preview = String(preview ?? "");
  const isImage = preview.startsWith("data:image/png;base64,") || imageRows(preview) !== null;
  div.className = `card ${cls}` + (isImage ? "" : " text");
  div.appendChild(previewElement(preview, size));
  for (const [text, lineCls] of lines) {
    const span = document.createElement("div");
    if (lineCls) span.className = lineCls;
    span.textContent = text;
    div.appendChild(span);
  }
  return div;
}

async function loadPicker() {
  const page = await call(`/examples?split=test&offset=${state.offset}&limit=${PAGE}`);
  const picker = $("picker");
  picker.replaceChildren();
  const onlyWrong = $("only-wrong").checked;
  for (const ex of page.examples) {
    const wrong = ex.prediction !== ex.label;
    if (onlyWrong && !wrong) continue;
    const c = card(ex.preview, [[`#${ex.example_id}`], [`label ${ex.label} · pred ${ex.prediction}`]], "pick" + (wrong ? " wrong" : ""), 40);
    c.dataset.testId = ex.example_id;
    if (ex.example_id === state.selected) c.classList.add("selected");
    c.addEventListener("click", () => { $("test-id").value = ex.example_id; explain({ test_ids: [ex.example_id] }); });
    picker.appendChild(c);
  }
  const end = Math.min(page.offset + PAGE, page.total);
  $("picker-range").textContent = `${page.offset}–${end - 1} of ${page.total}`;
}

function render(exp, preview) {
  const p = Math.max(...exp.probabilities);
  const title = exp.test_id === null ? "typed input" : `test example #${exp.test_id}`;
  const lines = [[title], [`predicted ${exp.prediction} (p = ${p.toFixed(2)})`, "score"]];
  if (exp.label !== null) lines.push([`true label ${exp.label}`]);
  if (exp.target !== exp.prediction) lines.push([`explaining class ${exp.target}`]);
  $("query").replaceChildren(card(preview, lines, "query-card", 112));
  for (const kind of ["proponents", "opponents"]) {
    const box = $(kind);
    box.replaceChildren();
    for (const inf of exp[kind]) {
      const c = card(inf.preview, [
        [`#${inf.example_id}`],
        [`label ${inf.label}`],
        [`${inf.score >= 0 ? "+" : ""}${inf.score.toPrecision(3)}`, "score"],
      ], kind.slice(0, -1));
      c.dataset.exampleId = inf.example_id;
      box.appendChild(c);
    }
    if (exp[kind].length === 0) box.textContent = "none";
  }
  const d = exp.diagnostics;
  $("diagnostics").textContent = `method ${exp.method}` + (d ? " · " + Object.entries(d).map(([k, v]) => `${k} ${Number(v).toPrecision(3)}`).join(" · ") : "");
  $("result").hidden = false;
}

// Each reload or explain takes a generation number; only the latest one may set the page's final state, so a
// slow earlier request finishing late cannot overwrite what the user asked for last.
function settle(generation, finalState) {
  if (generation === state.generation) document.body.dataset.state = finalState;
}

async function explain(query) {
  const generation = ++state.generation;
  $("error").hidden = true;
  document.body.dataset.state = "loading";
  const k = Math.max(1, Math.min(50, parseInt($("k").value, 10) || 8));
  try {
    const [exp] = await call("/explain", { ...query, k, method: $("method").value });
    let preview = query.inputs ? query.inputs[0] : "";
    if (query.test_ids) {
      state.selected = query.test_ids[0];
      preview = (await call(`/examples/${query.test_ids[0]}?split=test`)).preview;
      for (const c of document.querySelectorAll("#picker .card")) c.classList.toggle("selected", Number(c.dataset.testId) === state.selected);
    }
    if (generation !== state.generation) return;
    render(exp, preview);
    settle(generation, "explained");
  } catch (err) {
    showError(err);
    settle(generation, "error");
  }
}

async function init() {
  const generation = ++state.generation;
  $("error").hidden = true;
  document.body.dataset.state = "loading";
  try {
    const h = await (await fetch("/health")).json();
    state.health = h;
    $("run-info").textContent = `run ${h.run} · ${h.n_train} training and ${h.n_test} test examples · ${h.n_classes} classes`;
    $("key-field").hidden = !h.key_required;
    $("test-id").max = h.n_test - 1;
    $("text-query").hidden = !h.accepts_inputs;
    await loadPicker();
    settle(generation, "ready");
  } catch (err) {
    showError(err);
    settle(generation, "error");
  }
}

$("api-key").value = localStorage.getItem("influence-api-key") || "";
// A native "change" also fires when the field loses focus (e.g. on the first click on a digit): reload only when
// the key really changed, or that reload races the explain the click started and overwrites its state.
$("api-key").addEventListener("change", () => {
  if ($("api-key").value === localStorage.getItem("influence-api-key")) return;
  localStorage.setItem("influence-api-key", $("api-key").value);
  init();
});
$("explain").addEventListener("click", () => explain({ test_ids: [parseInt($("test-id").value, 10)] }));
$("explain-text").addEventListener("click", () => explain({ inputs: [$("text-input").value] }));
$("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadPicker().catch(showError); });
$("next").addEventListener("click", () => {
  if (state.health && state.offset + PAGE < state.health.n_test) state.offset += PAGE;
  loadPicker().catch(showError);
});
$("only-wrong").addEventListener("change", () => loadPicker().catch(showError));
init();
