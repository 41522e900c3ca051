// stream-serve's page: a chat over /v1/chat/completions (streamed) and a live view of the layer
// stream from /v1/stream-stats (server-sent events, read with fetch so the API key can go in a
// header). Plain JS, no build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "stream-run-api-key";
const STATE_NAMES = { c: "computing", r: "reading", R: "resident", s: "streamed",
                      h: "host RAM", "-": "on disk" };
const conversation = [];  // {role, content} of the conversation, the system prompt excluded
let modelId = null;
let running = null;  // the AbortController of the generation in progress
let keyWaiters = null;

// ---- the API key -------------------------------------------------------------------------
function apiKey() { return sessionStorage.getItem(KEY_STORE) || ""; }

function askKey() {  // one dialog for every call that got a 401; resolves when a key is given
  if (!keyWaiters) {
    keyWaiters = [];
    $("key-input").value = "";
    $("key-dialog").showModal();
  }
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("key-form").addEventListener("submit", () => {
  sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
  const waiters = keyWaiters || [];
  keyWaiters = null;
  waiters.forEach((w) => w());
});
$("key-button").addEventListener("click", () => { askKey().then(() => restartStats()); });

async function api(path, options = {}) {
  for (;;) {
    const headers = { ...(options.headers || {}) };
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    const resp = await fetch(path, { ...options, headers });
    if (resp.status !== 401) return resp;
    await askKey();
  }
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || `HTTP ${resp.status}`;
  } catch (e) { return `HTTP ${resp.status}`; }
}

// Server-sent events from a fetch body: calls onEvent(name, data) per event.
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trimStart();
      }
      if (data) onEvent(name, data);
    }
  }
}

// ---- rendering messages ------------------------------------------------------------------
function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;",
                                          '"': "&quot;", "'": "&#39;" }[c]));
}

// Fenced code blocks as <pre><code>, `inline code`, the rest as text (white-space: pre-wrap).
function renderText(text) {
  const parts = text.split(/```/);
  return parts.map((part, i) => {
    if (i % 2 === 1) {
      const nl = part.indexOf("\n");
      const lang = nl > 0 ? part.slice(0, nl).trim() : "";
      const code = nl >= 0 && /^[\w+#.-]*$/.test(lang) ? part.slice(nl + 1) : part;
      return `<pre><code${lang ? ` data-lang="${escapeHtml(lang)}"` : ""}>` +
             `${escapeHtml(code.replace(/\n$/, ""))}</code></pre>`;
    }
    return escapeHtml(part).replace(/`([^`\n]+)`/g, "<code>$1</code>");
  }).join("");
}

function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.innerHTML = renderText(text);
  $("messages").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function setRunning(controller) {
  running = controller;
  $("send").disabled = !!controller;
  $("stop").disabled = !controller;
  $("regen").disabled = !!controller || !conversation.some((m) => m.role === "user");
}

// ---- chat --------------------------------------------------------------------------------
async function generate() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = { model: modelId || "default", messages, stream: true,
                 temperature: Number($("temperature").value),
                 max_tokens: Math.max(1, parseInt($("max-tokens").value, 10) || 256) };
  const el = addMessage("assistant", "");
  el.classList.add("streaming");
  const controller = new AbortController();
  setRunning(controller);
  let text = "", finish = null, t0 = performance.now(), nChunks = 0;
  try {
    const resp = await api("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readEvents(resp, (_name, data) => {
      if (data === "[DONE]") return;
      const obj = JSON.parse(data);
      if (obj.error) throw new Error(obj.error.message);
      const choice = obj.choices && obj.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        text += choice.delta.content;
        nChunks += 1;
        el.innerHTML = renderText(text);
        el.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else { el.classList.add("error"); text += (text ? "\n" : "") + `error: ${err.message}`; }
  } finally {
    el.classList.remove("streaming");
    el.innerHTML = renderText(text);
    const s = (performance.now() - t0) / 1000;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${finish || "ended"} · ${nChunks} chunks · ${s.toFixed(1)} s`;
    el.appendChild(meta);
    if (!el.classList.contains("error")) conversation.push({ role: "assistant", content: text });
    setRunning(null);
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || running) return;
  $("input").value = "";
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  generate();
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (running) running.abort(); });
$("regen").addEventListener("click", () => {
  if (running) return;
  while (conversation.length && conversation[conversation.length - 1].role === "assistant") conversation.pop();
  const msgs = $("messages");
  while (msgs.lastChild && !msgs.lastChild.classList.contains("user")) {
    msgs.removeChild(msgs.lastChild);
  }
  if (conversation.length) generate();
});
$("clear").addEventListener("click", () => {
  if (running) running.abort();
  conversation.length = 0;
  $("messages").innerHTML = "";
  setRunning(null);
});

// ---- the layer stream --------------------------------------------------------------------
let info = null;
let statsController = null;

function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(n < 10 && i ? 2 : n < 100 && i ? 1 : 0)} ${units[i]}`;
}
function setText(id, text) {  // only what changed: each write costs a layout
  const el = $(id);
  if (el.textContent !== text) el.textContent = text;
}
const pct = (x) => (x == null ? "–" : `${(100 * x).toFixed(1)} %`);

function buildStrip(model) {
  info = model;
  $("model-name").textContent = model.model;
  $("m-window").textContent = model.window_s;
  const strip = $("strip");
  strip.innerHTML = "";
  for (const u of model.units) {
    const cell = document.createElement("div");
    cell.className = "cell";
    cell.title = `${u.key}: ${fmtBytes(u.bytes)}`;
    strip.appendChild(cell);
  }
  $("legend").innerHTML = Object.entries(STATE_NAMES).map(([k, name]) =>
    `<span><span class="cell" data-state="${escapeHtml(k)}"></span>${name}</span>`).join("");
}

function showFrame(f) {
  const strip = $("strip");
  const cells = strip.children;
  for (let i = 0; i < cells.length && i < f.units.length; i++) {
    const st = f.units[i];
    if (cells[i].dataset.state === st) continue;  // touch only the cells that change
    cells[i].dataset.state = st;
    cells[i].title = `${info.units[i].key}: ${STATE_NAMES[st] || st}, ` +
                     `${fmtBytes(info.units[i].bytes)}`;
  }
  strip.dataset.frames = String(Number(strip.dataset.frames) + 1);
  strip.dataset.states = f.units;
  const seen = new Set(strip.dataset.seen);
  for (const c of f.units) seen.add(c);
  strip.dataset.seen = [...seen].sort().join("");

  const r = f.recent;
  setText("m-tps", r.decode_tokens ? `${r.tokens_per_s.toFixed(1)} tok/s`
    : (r.passes ? "prompt" : "idle"));
  const ceiling = info.disk_ceiling_bytes_per_s;
  setText("m-disk", `${fmtBytes(r.disk_bytes_per_s)}/s` +
    (ceiling ? ` of ${fmtBytes(ceiling)}/s` : "") + ` · busy ${pct(r.disk_busy_share)}`);
  const width = `${Math.round(ceiling ? Math.min(100, 100 * r.disk_bytes_per_s / ceiling)
    : 100 * r.disk_busy_share)}%`;
  if ($("m-disk-bar").style.width !== width) $("m-disk-bar").style.width = width;
  setText("m-bpt", r.decode_tokens ? fmtBytes(r.bytes_per_token) : "–");
  setText("m-stall", r.passes ? pct(r.io_stall_share) : "–");
  setText("m-hit", pct(r.unit_hit_rate));
  const tier = (t) => (t.budget_bytes === 0 ? "off"
    : `${pct(t.hits + t.misses ? t.hit_rate : null)} · ` +
      `${fmtBytes(t.used_bytes)}${t.budget_bytes != null ? ` of ${fmtBytes(t.budget_bytes)}` : ""}`);
  setText("m-compute", tier(f.tiers.compute));
  setText("m-host", tier(f.tiers.host));
  if ($("m-expert-row").hidden !== (r.expert_hit_rate == null)) {
    $("m-expert-row").hidden = r.expert_hit_rate == null;
  }
  setText("m-expert", pct(r.expert_hit_rate));
  setText("m-depth", String(f.depth));
  setText("m-reqs", `${f.active} active, ${f.waiting} waiting`);
  setText("m-total", `${fmtBytes(f.disk.bytes_read)} in ${f.disk.reads} reads`);
}

function setConn(text, cls) {
  $("conn").textContent = text;
  $("conn").className = `pill ${cls || ""}`;
}

async function runStats() {
  const controller = new AbortController();
  statsController = controller;
  while (statsController === controller) {
    try {
      const resp = await api(`/v1/stream-stats?interval=${$("rate").value}`,
                             { signal: controller.signal });
      if (!resp.ok) {
        setConn(await errorText(resp), "bad");
        await new Promise((ok) => setTimeout(ok, 2000));
        continue;
      }
      setConn("live", "ok");
      await readEvents(resp, (name, data) => {
        if (name === "model") buildStrip(JSON.parse(data));
        else if (name === "frame" && info) showFrame(JSON.parse(data));
      });
      setConn("reconnecting");
    } catch (err) {
      if (err.name === "AbortError") return;
      setConn("offline", "bad");
    }
    await new Promise((ok) => setTimeout(ok, 1000));
  }
}

function restartStats() {
  if (statsController) statsController.abort();
  statsController = null;
  runStats();
}

async function loadModel() {
  try {
    const resp = await api("/v1/models");
    if (resp.ok) {
      const body = await resp.json();
      modelId = body.data[0].id;
      if (!info) $("model-name").textContent = modelId;
    }
  } catch (err) { /* the stats stream reports the connection */ }
}

// frames per second: more follow the passes closer, and cost the browser more CPU
const RATE_STORE = "stream-run-stats-interval";
if ([...$("rate").options].some((o) => o.value === localStorage.getItem(RATE_STORE))) {
  $("rate").value = localStorage.getItem(RATE_STORE);
}
$("rate").addEventListener("change", () => {
  localStorage.setItem(RATE_STORE, $("rate").value);
  restartStats();
});

// a hidden tab takes no frames: the stream closes, and with no watcher the engine's hooks are off
document.addEventListener("visibilitychange", () => {
  if (document.hidden) {
    if (statsController) statsController.abort();
    statsController = null;
    setConn("paused");
  } else if (!statsController) {
    runStats();
  }
});

setRunning(null);
loadModel().then(runStats);
