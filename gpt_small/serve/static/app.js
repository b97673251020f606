// gpt-small's page: streams /v1/poem (server-sent events over fetch) into the sheet.
"use strict";

const $ = (id) => document.getElementById(id);
let modelName = "the model";
let apiKey = sessionStorage.getItem("gpt-small-key") || "";

fetch("/healthz").then((r) => r.json()).then((h) => {
  modelName = h.model;
  document.title = `${h.model} · write a poem`;
  $("status").textContent = `${h.model} · ${(h.params / 1e6).toFixed(1)}M parameters · ready`;
}).catch(() => { $("status").textContent = DOWN; });

// A readable sentence for what went wrong, never the browser's "Failed to fetch".
class PageError extends Error {}
const DOWN = "The server is not running, or this page cannot reach it. Start it again " +
  "(gpt-small serve) and press Write.";

// POST /v1/poem with stream: true; onText(piece) for each piece; resolves with the final object.
// A 401 asks for the API key once; a key the server refuses is said to be wrong, not asked again.
async function streamPoem(body, onText, signal) {
  let asked = false;
  for (;;) {
    const headers = { "Content-Type": "application/json" };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    let r;
    try {
      r = await fetch("/v1/poem", { method: "POST", headers, signal, body: JSON.stringify({ ...body, stream: true }) });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new PageError(DOWN);
    }
    if (r.status === 401) {
      const hadKey = Boolean(apiKey);
      apiKey = "";
      sessionStorage.removeItem("gpt-small-key");
      if (asked || hadKey) throw new PageError("The API key was wrong: the server refused it. Press Write to enter it again.");
      asked = true;
      const key = window.prompt("This server wants an API key:");
      if (!key) throw new PageError("This server needs an API key; none was given.");
      apiKey = key;
      sessionStorage.setItem("gpt-small-key", key);
      continue;
    }
    if (!r.ok) {
      const err = await r.json().catch(() => null);
      throw new PageError(err?.error?.message || `the server answered ${r.status}`);
    }
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "", result = null;
    for (;;) {
      let value, done;
      try {
        ({ value, done } = await reader.read());
      } catch (e) {
        if (e.name === "AbortError") throw e;
        throw new PageError("The connection to the server was lost while writing. " + DOWN);
      }
      if (done) {
        if (!result) throw new PageError("The server stopped before the poem was finished. " + DOWN);
        return result;
      }
      buf += value;
      let k;
      while ((k = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, k);
        buf = buf.slice(k + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") {
          if (!result) throw new PageError("The server could not finish this poem (see its log).");
          return result;
        }
        const msg = JSON.parse(data);
        if (msg.error) throw new PageError(`The server failed while writing: ${msg.error.message}`);
        if (msg.done) result = msg; else onText(msg.text);
      }
    }
  }
}

const rate = (t) => (t && t.tokens_per_s ? `${t.tokens} tokens · ${Math.round(t.tokens_per_s)} tokens/s` : "");
const randomSeed = () => Math.floor(Math.random() * 2 ** 31);

// --- write mode ---
let controller = null;
const FIXED = { sonnet: 10, limerick: null };  // forms with their own length; the sonnet's syllables
const FORM_NAMES = { free: "free verse", couplets: "couplets", quatrains: "quatrains", sonnet: "sonnet", limerick: "limerick" };

function setBusy(busy) {
  $("write").disabled = busy;
  $("stop").disabled = !busy;
  $("again").disabled = busy;
  document.querySelector("#panel-write .sheet").setAttribute("aria-busy", String(busy));
}

// The poem as one block per line (hanging indents); the prompt's part in its own colour.
let shownText = "";  // what Copy copies

function renderPoem(prompt, text) {
  shownText = prompt + text;
  const poem = $("poem");
  poem.textContent = "";
  let left = prompt.length;
  for (const line of (prompt + text).split(/(?<=\n)/)) {
    const el = document.createElement("span");
    el.className = line === "\n" ? "line blank" : "line";
    const mine = Math.min(left, line.length);
    if (mine > 0) {
      const p = document.createElement("span");
      p.className = "prompt";
      p.textContent = line.slice(0, mine);
      el.append(p);
    }
    if (line.length > mine) el.append(document.createTextNode(line.slice(mine)));
    left -= mine;
    poem.append(el);
  }
}

function renderCheck(form) {
  const box = $("check");
  box.textContent = "";
  box.hidden = !form;
  if (!form) return;
  const what = [form.name && FORM_NAMES[form.name], form.rhyme && `rhyme ${form.rhyme}`,
    form.syllables && `${form.syllables}±${form.tolerance} syllables`].filter(Boolean).join(", ");
  const p = document.createElement("p");
  p.className = form.all_met ? "met" : "";
  p.textContent = form.all_met
    ? `✓ All ${form.lines_total} lines meet the form (${what}).`
    : `${form.lines_met} of ${form.lines_total} lines meet the form (${what}).`;
  box.append(p);
  const missed = form.lines.filter((m) => !m.met);
  if (missed.length) {
    const ol = document.createElement("ol");
    for (const m of missed) {
      const li = document.createElement("li");
      li.value = m.line;
      li.textContent = `line ${m.line}: ${m.violations.join("; ")}`;
      ol.append(li);
    }
    box.append(ol);
  }
}

function showSeed(seed) {
  $("seed").hidden = $("again").hidden = seed == null;
  $("seed").textContent = seed == null ? "" : `seed ${seed}`;
  $("again").disabled = seed == null;
}

function showCut(result, text) {
  $("cut").hidden = result?.finish_reason !== "length";
  $("cut").textContent = `Cut at ${text.length} characters (the server's length limit); the poem stops there.`;
}

function settings() {
  const form = $("form").value;
  const syl = $("syllables").value ? +$("syllables").value : null;
  return { form, lines: +$("lines").value, syllables: syl, temperature: +$("temp").value };
}

function applySettings(s) {
  $("form").value = s.form || "free";
  $("lines").value = s.lines;
  $("lines-out").textContent = s.lines;
  $("syllables").value = s.syllables ?? "";
  $("temp").value = s.temperature;
  $("temp-out").textContent = s.temperature;
  formChanged(false);
}

function formChanged(fromUser = true) {
  const form = $("form").value;
  const fixed = form in FIXED;
  $("lines").disabled = fixed;
  $("lines").title = fixed ? `a ${form} has its own length` : "";
  if (fromUser) $("syllables").value = FIXED[form] ?? "";
}

function requestBody(prompt, s, seed) {
  const body = { prompt, temperature: s.temperature, seed };
  if (s.form !== "free") body.form = s.form;
  if (!(s.form in FIXED)) body.lines = s.lines;
  if (s.syllables) body.syllables = s.syllables;
  return body;
}

let lastRun = null;  // {prompt, settings, seed}: what "again with this seed" repeats

async function write(seed = randomSeed(), s = settings(), prompt = $("prompt").value) {
  if (controller) return;
  let text = "";
  renderPoem(prompt, text);
  renderCheck(null);
  showCut(null, "");
  showSeed(seed);
  lastRun = { prompt, settings: s, seed };
  controller = new AbortController();
  setBusy(true);
  $("copy").disabled = true;
  const started = performance.now();
  $("status").textContent = `${modelName} · writing${s.form !== "free" ? ` a ${FORM_NAMES[s.form]}` : ""}…`;
  try {
    const result = await streamPoem(requestBody(prompt, s, seed),
      (piece) => {
        text += piece;
        renderPoem(prompt, text);
        const secs = (performance.now() - started) / 1000;
        $("status").textContent = `${modelName} · writing… ${Math.round(text.length / secs)} chars/s`;
      },
      controller.signal,
    );
    text = result.text;
    renderPoem(prompt, text);
    renderCheck(result.form);
    showCut(result, text);
    $("status").textContent = `${modelName} · ` + (result.form
      ? `${result.form.lines_total} lines from ${result.form.candidates.toLocaleString("en")} candidates · ` +
        `${(result.timing.ms / 1000).toFixed(1)} s`
      : rate(result.timing));
    remember({ prompt, text, settings: s, seed, form: result.form || null, cut: result.finish_reason === "length" });
  } catch (e) {
    const secs = (performance.now() - started) / 1000;
    $("status").textContent = e.name === "AbortError"
      ? `${modelName} · stopped after ${text.length} characters (${Math.round(text.length / secs)}/s)`
      : (e instanceof PageError ? e.message : `Could not write: ${e.message}`);
  } finally {
    controller = null;
    setBusy(false);
    $("copy").disabled = !(prompt + text);
  }
}

// --- history: the last poems, in this browser's local storage ---
const HISTORY_KEY = "gpt-small-history";
const HISTORY_MAX = 20;

function loadHistory() {
  try {
    const h = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
    return Array.isArray(h) ? h.filter((e) => e && e.settings && typeof e.text === "string") : [];
  } catch {
    return [];
  }
}

function saveHistory(h) {
  try {
    localStorage.setItem(HISTORY_KEY, JSON.stringify(h.slice(0, HISTORY_MAX)));
  } catch {
    $("status").textContent = "This browser would not keep the poem (its storage is full or off).";
  }
}

function titleOf(entry) {
  const first = (entry.prompt + entry.text).split("\n").find((l) => l.trim()) || "(untitled)";
  return first.length > 60 ? first.slice(0, 59) + "…" : first;
}

function remember(entry) {
  const h = loadHistory();
  h.unshift({ id: `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`, when: new Date().toISOString(), ...entry });
  saveHistory(h);
  renderHistory();
}

function reopen(entry) {
  if (controller) return;
  applySettings(entry.settings);
  $("prompt").value = entry.prompt;
  renderPoem(entry.prompt, entry.text);
  renderCheck(entry.form);
  showCut({ finish_reason: entry.cut ? "length" : "stop" }, entry.text);
  showSeed(entry.seed);
  lastRun = { prompt: entry.prompt, settings: entry.settings, seed: entry.seed };
  $("copy").disabled = false;
  $("status").textContent = `${modelName} · reopened from ${new Date(entry.when).toLocaleString()}`;
}

function renderHistory() {
  const list = $("history");
  const h = loadHistory();
  list.textContent = "";
  $("history-empty").hidden = h.length > 0;
  for (const entry of h) {
    const li = document.createElement("li");
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = titleOf(entry);
    const s = entry.settings;
    const info = document.createElement("span");
    info.className = "settings";
    info.textContent = [FORM_NAMES[s.form] || "free verse", s.form in FIXED ? "" : `${s.lines} lines`,
      s.syllables ? `${s.syllables} syllables` : "", `temperature ${s.temperature}`, `seed ${entry.seed}`]
      .filter(Boolean).join(" · ");
    const buttons = [["Reopen", () => reopen(entry)],
      ["Copy", (b) => copyText(entry.prompt + entry.text, b)],
      ["Delete", () => { saveHistory(loadHistory().filter((x) => x.id !== entry.id)); renderHistory(); }]];
    const what = document.createElement("span");
    what.className = "what";
    what.append(title, info);
    const actions = document.createElement("span");
    actions.className = "actions";
    for (const [label, act] of buttons) {
      const b = document.createElement("button");
      b.className = "quiet";
      b.textContent = label;
      b.ariaLabel = `${label}: ${title.textContent}`;
      b.addEventListener("click", () => act(b));
      actions.append(b);
    }
    li.append(what, actions);
    list.append(li);
  }
}

function stop() {
  if (controller) controller.abort();
  if (coController) coController.abort();
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const t = document.createElement("textarea");  // pages served over plain HTTP may lack the clipboard API
    t.value = text;
    document.body.append(t);
    t.select();
    document.execCommand("copy");
    t.remove();
  }
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = label), 1200);
}

$("write").addEventListener("click", () => write());
$("again").addEventListener("click", () => lastRun && write(lastRun.seed, lastRun.settings, lastRun.prompt));
$("stop").addEventListener("click", stop);
$("copy").addEventListener("click", () => copyText(shownText, $("copy")));
$("form").addEventListener("change", () => formChanged());
formChanged(false);  // a reload may have restored the controls
renderHistory();
for (const id of ["temp", "lines"]) {
  $(id).addEventListener("input", () => ($(`${id}-out`).textContent = $(id).value));
}
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); write(); }
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });

// --- co-writing mode: verses = [{who: "person" | "model", text}] ---
const verses = [];
const STANZA = 4;  // lines per stanza when writing together
let coController = null;

function renderVerses() {
  const list = $("verses");
  list.textContent = "";
  verses.forEach((v, i) => {
    const li = document.createElement("li");
    li.className = v.who + (v.pending ? " pending" : "");
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = v.text;
    li.append(text);
    if (v.who === "model" && !v.pending) {
      const b = document.createElement("button");
      b.className = "reroll quiet";
      b.textContent = "↻";
      b.title = b.ariaLabel = `Re-roll line ${i + 1}`;
      b.addEventListener("click", () => answer(1, i));
      li.append(b);
    }
    list.append(li);
    if ((i + 1) % STANZA === 0 && i + 1 < verses.length) {  // a stanza break between stanzas of four
      const gap = document.createElement("li");
      gap.className = "blank";
      gap.ariaHidden = "true";
      list.append(gap);
    }
  });
}

function setCoBusy(busy) {
  for (const id of ["answer", "finish"]) $(id).disabled = busy;
  $("co-stop").disabled = !busy;
  for (const b of document.querySelectorAll("#verses button")) b.disabled = busy;
}

// The model writes `lines` lines after verse `at` (replacing from there: a re-roll), or at the end.
async function answer(lines, at = verses.length) {
  if (coController) return;
  const before = verses.slice(0, at).map((v) => v.text + "\n").join("");
  const replaced = verses.splice(at, at < verses.length ? 1 : 0);
  let current = { who: "model", text: "", pending: true };
  verses.splice(at, 0, current);
  renderVerses();
  coController = new AbortController();
  setCoBusy(true);
  const started = performance.now();
  let chars = 0;
  try {
    const result = await streamPoem({ prompt: before, lines, temperature: +$("temp").value, seed: randomSeed() },
      (piece) => {
        chars += piece.length;
        const parts = piece.split("\n");
        current.text += parts[0];
        for (const part of parts.slice(1)) {  // a new line: a new verse (the last newline opens an empty one)
          current.pending = false;
          current = { who: "model", text: part, pending: true };
          at += 1;
          verses.splice(at, 0, current);
        }
        renderVerses();
      }, coController.signal);
    $("co-status").textContent = `${modelName} · ${rate(result?.timing)}`;
  } catch (e) {
    if (e.name !== "AbortError") {
      $("co-status").textContent = e instanceof PageError ? e.message : `Could not write: ${e.message}`;
      if (!current.text && replaced.length) verses.splice(at, 1, ...replaced);
    } else {
      $("co-status").textContent = `${modelName} · stopped after ${chars} characters (${Math.round(chars / ((performance.now() - started) / 1000))}/s)`;
    }
  } finally {
    current.pending = false;
    if (!current.text) verses.splice(verses.indexOf(current), 1);  // the empty verse after the last newline
    coController = null;
    setCoBusy(false);
    renderVerses();
    $("line").focus();
  }
}

function addLine() {
  const line = $("line").value.trim();
  if (line) verses.push({ who: "person", text: line });
  $("line").value = "";
  answer(1);
}

$("answer").addEventListener("click", addLine);
$("line").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); addLine(); } });
$("finish").addEventListener("click", () => {
  const sinceBreak = verses.length % STANZA;
  answer(sinceBreak ? STANZA - sinceBreak : STANZA);
});
$("co-stop").addEventListener("click", stop);
$("co-copy").addEventListener("click", () => copyText(verses.map((v, i) => v.text + ((i + 1) % STANZA === 0 && i + 1 < verses.length ? "\n" : "")).join("\n") + "\n", $("co-copy")));
$("co-clear").addEventListener("click", () => { verses.length = 0; renderVerses(); $("line").focus(); });

// --- tabs: arrow keys move between them, as a tablist does ---
const tabs = [$("tab-write"), $("tab-cowrite")];
function select(tab) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  tab.focus();
}
tabs.forEach((t, i) => {
  t.addEventListener("click", () => select(t));
  t.addEventListener("keydown", (e) => {
    if (e.key === "ArrowRight" || e.key === "ArrowLeft") select(tabs[(i + (e.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length]);
  });
});
