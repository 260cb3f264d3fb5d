// "Clean a dataset": the label-noise job's suspects, most suspicious first, each with its preview, label,
// suggested label and buttons that record a decision (POST /decisions). Decisions come back from
// GET /decisions on every load, so a reload (or another reviewer's page) shows what is in force.
// Plain DOM, no build step; previewElement comes from preview.js.
"use strict";

const PAGE = 24;
const state = { health: null, offset: 0, decisions: new Map(), generation: 0 };
const $ = (id) => document.getElementById(id);

function key() {
  return $("api-key").value || localStorage.getItem("influence-api-key") || "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (key()) h["X-API-Key"] = key();
  const reviewer = $("reviewer").value.trim();
  if (reviewer) h["X-Reviewer"] = reviewer;
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

function settle(generation, finalState) {
  if (generation === state.generation) document.body.dataset.state = finalState;
}

function describe(d) {
  if (!d) return "";
  const who = d.reviewer ? ` · ${d.reviewer}` : "";
  return (d.decision === "relabel" ? `relabel → ${d.label}` : d.decision) + who;
}

function showDecision(card, d) {
  if (d) card.dataset.decision = d.decision;
  else delete card.dataset.decision;
  card.querySelector(".decision").textContent = describe(d);
  if (d && d.decision === "relabel") card.querySelector("select").value = String(d.label);
}

function updateCount() {
  const counts = { relabel: 0, keep: 0, remove: 0 };
  for (const d of state.decisions.values()) counts[d.decision] += 1;
  $("decided").textContent = `${state.decisions.size} decided: ${counts.relabel} relabel, ${counts.keep} keep, ${counts.remove} remove`;
}

async function decide(card, decision) {
  const generation = ++state.generation;
  $("error").hidden = true;
  document.body.dataset.state = "saving";
  const exampleId = Number(card.dataset.exampleId);
  const label = decision === "relabel" ? Number(card.querySelector("select").value) : null;
  try {
    const d = await call("/decisions", { example_id: exampleId, decision, label });
    state.decisions.set(exampleId, d);
    for (const c of document.querySelectorAll(`.card[data-example-id='${exampleId}']`)) showDecision(c, d);
    updateCount();
    settle(generation, "saved");
  } catch (err) {
    showError(err);
    settle(generation, "error");
  }
}

function suspectCard(s, rank, signals) {
  const div = document.createElement("div");
  div.className = "card suspect";
  div.dataset.exampleId = s.example_id;
  const r = document.createElement("span");
  r.className = "rank";
  r.textContent = rank;
  div.appendChild(r);
  div.appendChild(previewElement(s.preview, 72));
  const lines = [
    [`#${s.example_id}`, "id"],
    [`label ${s.label} · suggested `, "labels"],
    [signals, "signals muted"],
  ];
  for (const [text, cls] of lines) {
    const line = document.createElement("div");
    line.className = cls;
    line.textContent = text;
    if (cls === "labels") {
      const sug = document.createElement("span");
      sug.className = "suggested";
      sug.textContent = s.suggested_label === null ? "–" : s.suggested_label;
      line.appendChild(sug);
    }
    div.appendChild(line);
  }
  const actions = document.createElement("div");
  actions.className = "actions";
  const select = document.createElement("select");
  select.setAttribute("aria-label", "new label");
  for (let c = 0; c < state.health.n_classes; c++) {
    const o = document.createElement("option");
    o.value = o.textContent = String(c);
    select.appendChild(o);
  }
  select.value = String(s.suggested_label ?? s.prediction);
  actions.appendChild(select);
  for (const decision of ["relabel", "keep", "remove"]) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = decision;
    b.textContent = decision;
    b.addEventListener("click", () => decide(div, decision));
    actions.appendChild(b);
  }
  div.appendChild(actions);
  const status = document.createElement("div");
  status.className = "decision";
  div.appendChild(status);
  div.appendChild(influenceDetails(s.example_id));
  showDecision(div, state.decisions.get(s.example_id));
  return div;
}

// The test predictions the example supports / opposes most: GET /examples/{id}/influence, loaded lazily when
// the reviewer opens the card's "test predictions" (one scoring per card, kept once loaded).
function influenceDetails(exampleId) {
  const details = document.createElement("details");
  details.className = "influence";
  const summary = document.createElement("summary");
  summary.textContent = "test predictions";
  details.appendChild(summary);
  const body = document.createElement("div");
  body.className = "muted";
  details.appendChild(body);
  details.addEventListener("toggle", async () => {
    if (!details.open || details.dataset.loaded) return;
    details.dataset.loaded = "loading";
    body.textContent = "scoring…";
    try {
      const r = await call(`/examples/${exampleId}/influence?k=5`);
      const rows = (title, items) => {
        const block = document.createElement("div");
        block.className = title;
        block.textContent = `${title}: ` + (items.length ? items.map((a) => `#${a.test_id} (pred ${a.prediction}, label ${a.label ?? "–"}, ${Number(a.score).toPrecision(3)})`).join(" · ") : "none");
        return block;
      };
      body.replaceChildren(rows("supports", r.supports), rows("opposes", r.opposes));
      details.dataset.loaded = "done";
    } catch (e) {
      body.textContent = String(e.message || e);
      delete details.dataset.loaded;
    }
  });
  return details;
}

// GET /noise answers 409 NoiseNotRunError until the label-noise job has run: the page then shows no suspects.
async function noisePage() {
  try {
    return await call(`/noise?limit=${PAGE}&offset=${state.offset}`);
  } catch (err) {
    if (String(err.message).startsWith("409 NoiseNotRunError")) return [];
    throw err;
  }
}

async function loadPage() {
  const [suspects, decisions] = await Promise.all([
    noisePage(),
    call("/decisions"),
  ]);
  state.decisions = new Map(decisions.map((d) => [d.example_id, d]));
  const box = $("suspects");
  // the job's score, then the signals behind the rank (GET /noise stores them per example; {} for older runs)
  const stored = (s) => Object.entries(s.signals || {}).map(([k, v]) => ` · ${k} ${v === null ? "–" : Number(v).toPrecision(3)}`).join("");
  const signals = (s) => `score ${Number(s.suspect_score).toPrecision(3)} · pred ${s.prediction} · loss ${Number(s.loss).toPrecision(3)}${stored(s)}`;
  box.replaceChildren(...suspects.map((s, i) => suspectCard(s, state.offset + i + 1, signals(s))));
  $("empty").hidden = suspects.length > 0;
  $("empty").textContent = state.offset > 0 ? "no more suspects" : "no suspects yet: run the label-noise job first (`influence noise RUN`)";
  $("range").textContent = suspects.length ? `${state.offset + 1}–${state.offset + suspects.length} of ${state.health.n_train} training examples` : "";
  updateCount();
  await loadHarmful();
}

// The second list: per-training-example aggregates of the latest finished dump job (POST /dumps), most harmful
// first; the same decision buttons.
async function loadHarmful() {
  const page = await call("/clean/harmful?limit=12");
  const short = (v) => (Number.isInteger(v) ? String(v) : v.toPrecision(3));
  const signals = (e) => `${page.by} ${short(e.aggregates[page.by])} · pred ${e.prediction}`;
  $("harmful").replaceChildren(...page.examples.map((e, i) => suspectCard(e, i + 1, signals(e))));
  $("harmful-source").textContent = page.job ? `(dump job ${page.job}, by ${page.by})` : "";
  $("harmful-empty").hidden = page.examples.length > 0;
  $("harmful-empty").textContent = page.job ? "the dump found none" : "no finished dump yet: start one with POST /dumps (or `influence dump`) to see this list";
}

async function reload() {
  const generation = ++state.generation;
  $("error").hidden = true;
  document.body.dataset.state = "loading";
  try {
    await loadPage();
    settle(generation, "ready");
  } catch (err) {
    showError(err);
    settle(generation, "error");
  }
}

// The file route needs the key header, so the download is fetched and handed to the browser as a blob.
async function exportDecisions(format) {
  try {
    const res = await fetch(`/decisions/file?format=${format}`, { headers: headers() });
    if (!res.ok) {
      const data = await res.json();
      throw new Error(`${res.status} ${data.error || ""}: ${data.detail || ""}`);
    }
    const url = URL.createObjectURL(await res.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = `decisions.${format}`;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  } catch (err) {
    showError(err);
  }
}

async function init() {
  const generation = ++state.generation;
  $("error").hidden = true;
  document.body.dataset.state = "loading";
  try {
    const h = await (await fetch("/health")).json();
    state.health = h;
    $("run-info").textContent = `run ${h.run} · ${h.n_train} training examples · ${h.n_classes} classes`;
    $("key-field").hidden = !h.key_required;
    await loadPage();
    settle(generation, "ready");
  } catch (err) {
    showError(err);
    settle(generation, "error");
  }
}

$("api-key").value = localStorage.getItem("influence-api-key") || "";
$("reviewer").value = localStorage.getItem("influence-reviewer") || "";
$("api-key").addEventListener("change", () => {
  if ($("api-key").value === localStorage.getItem("influence-api-key")) return;
  localStorage.setItem("influence-api-key", $("api-key").value);
  init();
});
$("reviewer").addEventListener("change", () => localStorage.setItem("influence-reviewer", $("reviewer").value.trim()));
$("export").addEventListener("click", () => exportDecisions("csv"));
$("export-parquet").addEventListener("click", (e) => { e.preventDefault(); exportDecisions("parquet"); });
$("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); reload(); });
$("next").addEventListener("click", () => {
  if (state.health && state.offset + PAGE < state.health.n_train) state.offset += PAGE;
  reload();
});
init();
