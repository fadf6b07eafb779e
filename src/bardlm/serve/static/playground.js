// The playground: POST /v1/completions with stream=true and show the text as it arrives.
// Plain browser JavaScript, no libraries, no build step: the page loads nothing from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
let modelId = null;
let controller = null; // aborting it closes the connection, which stops generation on the server

// A server started with --api-key wants it as a Bearer token on every API call.
function authHeaders() {
  const key = $("api_key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: authHeaders() });
    if (r.status === 401) {
      $("model").textContent = "this server needs an API key: enter it below";
      return;
    }
    const m = (await r.json()).data[0];
    modelId = m.id;
    $("model").textContent = `${m.id} (context ${m.max_model_len} tokens)`;
    // prompt + max_tokens must fit in the context: leave the prompt some room by default
    const box = $("max_tokens");
    box.max = m.max_model_len - 1;
    if (+box.value > m.max_model_len / 2) box.value = Math.max(1, Math.floor(m.max_model_len / 2));
  } catch (e) {
    $("model").textContent = "model info unavailable";
  }
}

function numberOrNull(id, parse) {
  const v = $(id).value.trim();
  return v === "" ? null : parse(v);
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    max_tokens: numberOrNull("max_tokens", parseInt),
    temperature: numberOrNull("temperature", parseFloat) ?? 1,
    top_p: numberOrNull("top_p", parseFloat) ?? 1,
    stream: true,
    stream_options: { include_usage: true },
  };
  if (modelId) body.model = modelId;
  const topK = numberOrNull("top_k", parseInt);
  if (topK !== null) body.top_k = topK;
  const seed = numberOrNull("seed", parseInt);
  if (seed !== null) body.seed = seed;
  // "\n" typed in the box means a newline
  const stop = $("stop").value.replace(/\\n/g, "\n");
  if (stop) body.stop = [stop];
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

// Server-sent events arrive in arbitrary slices: split on blank lines, keep the unfinished tail.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function generate(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("shown-prompt").textContent = $("prompt").value;
  $("completion").textContent = "";
  $("go").disabled = true;
  $("halt").disabled = false;
  $("stats").textContent = "waiting…";
  controller = new AbortController();
  const t0 = performance.now();
  let tFirst = null;
  let pieces = 0;
  try {
    const r = await fetch("/v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      showError(`${r.status}: ${err.error?.message ?? r.statusText}`);
      $("stats").textContent = "";
      return;
    }
    for await (const data of sseEvents(r)) {
      if (data === "[DONE]") break;
      const msg = JSON.parse(data);
      if (msg.error) { showError(msg.error.message); break; }
      if (msg.usage) {
        const secs = (performance.now() - t0) / 1000;
        const n = msg.usage.completion_tokens;
        $("stats").textContent = `${n} tokens in ${secs.toFixed(2)} s: ${(n / secs).toFixed(1)} tokens/s`;
        continue;
      }
      const text = msg.choices[0].text;
      if (text) {
        tFirst ??= performance.now();
        pieces += 1;
        $("completion").textContent += text;
        const secs = (performance.now() - t0) / 1000;
        $("stats").textContent = `streaming… ${(pieces / secs).toFixed(1)} pieces/s`;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") $("stats").textContent = "stopped";
    else showError(String(e));
  } finally {
    $("go").disabled = false;
    $("halt").disabled = true;
    controller = null;
  }
}

$("form").addEventListener("submit", generate);
$("halt").addEventListener("click", () => controller?.abort());
$("api_key").addEventListener("change", loadModel);
loadModel();

// The chat tab: the conversation lives here and goes whole to /v1/chat/completions each turn.
let chatHistory = [];

function chatTurn(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  div.textContent = text;
  $("chat-log").appendChild(div);
  return div;
}

async function chatSend(event) {
  event.preventDefault();
  const text = $("chat-input").value;
  if (!text.trim()) return;
  $("chat-input").value = "";
  chatHistory.push({role: "user", content: text});
  chatTurn("user", text);
  const reply = chatTurn("assistant", "");
  const system = $("chat-system").value.trim();
  const base = requestBody();
  const body = {messages: (system ? [{role: "system", content: system}] : []).concat(chatHistory),
                stream: true, temperature: base.temperature, top_p: base.top_p, seed: base.seed,
                max_tokens: base.max_tokens};
  if (base.top_k !== undefined) body.top_k = base.top_k;
  if (modelId) body.model = modelId;
  $("chat-send").disabled = true;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body)});
    if (!r.ok) throw new Error((await r.json()).error.message);
    for await (const raw of sseEvents(r)) {
      if (raw === "[DONE]") break;
      const data = JSON.parse(raw);
      if (data.error) throw new Error(data.error.message);
      const delta = data.choices[0].delta;
      if (delta.content) reply.textContent += delta.content;
    }
    chatHistory.push({role: "assistant", content: reply.textContent});
  } catch (e) {
    chatHistory.pop();
    reply.remove();
    showError(String(e.message || e));
  } finally {
    $("chat-send").disabled = false;
  }
}

$("chat-form").addEventListener("submit", chatSend);
$("chat-reset").addEventListener("click", () => { chatHistory = []; $("chat-log").textContent = ""; });
