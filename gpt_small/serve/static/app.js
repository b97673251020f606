// gpt-small's page: streams /v1/poem (server-sent events over fetch) into the sheet.
"use strict";

const $ = (id) => document.getElementById(id);
let modelName = "the model";
let apiKey = sessionStorage.getItem("gpt-small-key") || "";

fetch("/healthz").then((r) => r.json()).then((h) => {
  modelName = h.model;
  document.title = `${h.model} · write a poem`;
  $("status").textContent = `${h.model} · ${(h.params / 1e6).toFixed(1)}M parameters · ready`;
}).catch(() => {});

// POST /v1/poem with stream: true; onText(piece) for each piece; resolves with the final object.
async function streamPoem(body, onText, signal) {
  for (;;) {
    const headers = { "Content-Type": "application/json" };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    const r = await fetch("/v1/poem", { method: "POST", headers, signal, body: JSON.stringify({ ...body, stream: true }) });
    if (r.status === 401) {
      const key = window.prompt("This server wants an API key:");
      if (!key) throw new Error("an API key is needed");
      apiKey = key;
      sessionStorage.setItem("gpt-small-key", key);
      continue;
    }
    if (!r.ok) {
      const err = await r.json().catch(() => null);
      throw new Error(err?.error?.message || `the server answered ${r.status}`);
    }
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "", result = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return result;
      buf += value;
      let k;
      while ((k = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, k);
        buf = buf.slice(k + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") return result;
        const msg = JSON.parse(data);
        if (msg.done) result = msg; else onText(msg.text);
      }
    }
  }
}

const rate = (t) => (t && t.tokens_per_s ? `${t.tokens} tokens · ${Math.round(t.tokens_per_s)} tokens/s` : "");
const randomSeed = () => Math.floor(Math.random() * 2 ** 31);

// --- write mode ---
let controller = null;

function setBusy(busy) {
  $("write").disabled = busy;
  $("stop").disabled = !busy;
  document.querySelector("#panel-write .sheet").setAttribute("aria-busy", String(busy));
}

async function write() {
  if (controller) return;
  const prompt = $("prompt").value;
  const poem = $("poem");
  poem.textContent = "";
  const head = document.createElement("span");
  head.className = "prompt";
  head.textContent = prompt;
  const body = document.createTextNode("");
  poem.append(head, body);
  controller = new AbortController();
  setBusy(true);
  $("copy").disabled = true;
  const started = performance.now();
  let chars = 0;
  $("status").textContent = `${modelName} · writing…`;
  try {
    const result = await streamPoem(
      { prompt, lines: +$("lines").value, temperature: +$("temp").value, seed: randomSeed() },
      (piece) => {
        body.appendData(piece);
        chars += piece.length;
        const s = (performance.now() - started) / 1000;
        $("status").textContent = `${modelName} · writing… ${Math.round(chars / s)} chars/s`;
      },
      controller.signal,
    );
    $("status").textContent = `${modelName} · ${rate(result?.timing)}`;
  } catch (e) {
    const s = (performance.now() - started) / 1000;
    $("status").textContent = e.name === "AbortError"
      ? `${modelName} · stopped after ${chars} characters (${Math.round(chars / s)}/s)`
      : `Could not write: ${e.message}`;
  } finally {
    controller = null;
    setBusy(false);
    $("copy").disabled = !poem.textContent;
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

$("write").addEventListener("click", write);
$("stop").addEventListener("click", stop);
$("copy").addEventListener("click", () => copyText($("poem").textContent, $("copy")));
for (const id of ["temp", "lines"]) {
  $(id).addEventListener("input", () => ($(`${id}-out`).textContent = $(id).value));
}
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); write(); }
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });

// --- co-writing mode: verses = [{who: "person" | "model", text}] ---
const verses = [];
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
      $("co-status").textContent = `Could not write: ${e.message}`;
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
  const sinceBreak = verses.length % 4;  // stanzas of four lines
  answer(sinceBreak ? 4 - sinceBreak : 4);
});
$("co-stop").addEventListener("click", stop);
$("co-copy").addEventListener("click", () => copyText(verses.map((v) => v.text).join("\n") + "\n", $("co-copy")));
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
