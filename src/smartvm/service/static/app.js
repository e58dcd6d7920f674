// The test page of `smartvm serve`: drives the /v1 API with the key kept in sessionStorage.
// Plain JS, no build step, nothing loaded from elsewhere (the page's CSP forbids it anyway).
"use strict";

const KEY = "smartvm.apiKey";
const POLL_MS = 2000;
let selectedId = null;
let pollTimer = null;

const $ = (id) => document.getElementById(id);

function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

function showError(text) {
  $("error-text").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

// One call to the API: JSON in and out; a failure is shown and rethrown.
async function api(method, path, body, raw) {
  const headers = { "X-API-Key": apiKey() };
  let payload;
  if (raw !== undefined) {
    payload = raw;
  } else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, { method, headers, body: payload });
  } catch (err) {
    showError(`${method} ${path}: the service did not answer (${err.message})`);
    throw err;
  }
  if (!res.ok) {
    let code = `HTTP ${res.status}`;
    let message = res.statusText;
    try {
      const e = await res.json();
      code = e.code || code;
      message = e.message || message;
    } catch (_) { /* not JSON */ }
    showError(`${code}: ${message}`);
    const err = new Error(message);
    err.code = code;
    err.status = res.status;
    throw err;
  }
  if (res.status === 204) return null;
  const type = res.headers.get("content-type") || "";
  return type.includes("application/json") ? res.json() : res.blob();
}

// Run an action from a button: errors are already shown, never swallowed silently.
function action(fn) {
  return async (event) => {
    if (event) event.preventDefault();
    try {
      await fn(event);
    } catch (err) {
      if (!err.code) showError(String(err.message || err));
    }
  };
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function button(parent, label, testid, fn) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.testid = testid;
  b.addEventListener("click", action(fn));
  parent.appendChild(b);
  return b;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  return `${(n / (1 << 30)).toFixed(2)} GiB`;
}

function endsIn(endAt) {
  const s = Math.round(endAt - Date.now() / 1000);
  return s > 0 ? `${s} s` : "due";
}

// --- sandboxes -----------------------------------------------------------------------------------
async function refreshSandboxes() {
  const list = await api("GET", "/v1/sandboxes");
  const body = $("sandboxes").querySelector("tbody");
  body.replaceChildren();
  for (const sb of list) {
    const row = document.createElement("tr");
    row.dataset.id = sb.id;
    if (sb.id === selectedId) row.className = "selected";
    cell(row, sb.id, "id");
    cell(row, sb.template);
    cell(row, sb.state, `state state-${sb.state}`);
    cell(row, String(sb.cpus));
    cell(row, `${sb.memory_mib} MiB`);
    cell(row, sb.state === "running" ? endsIn(sb.end_at) : "");
    const actions = cell(row, "");
    button(actions, "Select", "select", () => select(sb.id));
    button(actions, "Pause", "pause", async () => { await api("POST", `/v1/sandboxes/${sb.id}/pause`); await refresh(); });
    button(actions, "Resume", "resume", async () => { await api("POST", `/v1/sandboxes/${sb.id}/resume`); await refresh(); });
    button(actions, "Destroy", "destroy", async () => {
      await api("DELETE", `/v1/sandboxes/${sb.id}`);
      if (selectedId === sb.id) select(null);
      await refresh();
    });
    body.appendChild(row);
  }
  $("sandboxes-empty").hidden = list.length > 0;
  $("list-updated").textContent = `(updated ${new Date().toLocaleTimeString()})`;
  const chosen = list.find((sb) => sb.id === selectedId);
  $("selected-state").textContent = chosen ? chosen.state : "";
  $("selected-state").className = chosen ? `state state-${chosen.state}` : "state";
}

async function refreshSnapshots() {
  const list = await api("GET", "/v1/snapshots");
  const body = $("snapshots").querySelector("tbody");
  body.replaceChildren();
  for (const snap of list) {
    const row = document.createElement("tr");
    row.dataset.name = snap.name;
    cell(row, snap.name, "name");
    cell(row, snap.source_sandbox || "");
    cell(row, bytes(snap.size_bytes));
    cell(row, new Date(snap.created_at * 1000).toLocaleString());
    const actions = cell(row, "");
    button(actions, "Create sandbox", "create-from", async () => {
      const sb = await api("POST", "/v1/sandboxes", { template: snap.name });
      select(sb.id);
      await refresh();
    });
    button(actions, "Delete", "delete-snapshot", async () => {
      await api("DELETE", `/v1/snapshots/${encodeURIComponent(snap.name)}`);
      await refresh();
    });
    body.appendChild(row);
  }
  $("snapshots-empty").hidden = list.length > 0;
}

async function refresh() {
  await refreshSandboxes();
  await refreshSnapshots();
}

function select(id) {
  selectedId = id;
  $("selected").hidden = id === null;
  $("selected-id").textContent = id || "";
  $("exec-output").replaceChildren();
  $("files").querySelector("tbody").replaceChildren();
  for (const row of $("sandboxes").querySelectorAll("tbody tr")) {
    row.className = row.dataset.id === id ? "selected" : "";
  }
}

async function createSandbox() {
  const body = { template: $("create-template").value.trim() || "base" };
  const cpus = $("create-cpus").value;
  const memory = $("create-memory").value;
  const timeout = $("create-timeout").value;
  if (cpus) body.cpus = Number(cpus);
  if (memory) body.memory_mib = Number(memory);
  if (timeout) body.timeout = Number(timeout);
  $("create-status").textContent = "creating...";
  try {
    const sb = await api("POST", "/v1/sandboxes", body);
    $("create-status").textContent = `created ${sb.id}`;
    select(sb.id);
  } catch (err) {
    $("create-status").textContent = "failed";
    throw err;
  }
  await refresh();
}

// --- exec, streamed over a WebSocket --------------------------------------------------------------
function appendOutput(text, cls) {
  const span = document.createElement("span");
  span.textContent = text;
  if (cls) span.className = cls;
  $("exec-output").appendChild(span);
}

function runCommand() {
  const cmd = $("exec-cmd").value;
  if (!selectedId || !cmd.trim()) return Promise.resolve();
  $("exec-output").replaceChildren();
  $("exec-status").textContent = "running...";
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${scheme}//${location.host}/v1/sandboxes/${selectedId}/exec/stream`;
  return new Promise((resolve) => {
    const ws = new WebSocket(url, ["smartvm", `key.${apiKey()}`]);
    ws.addEventListener("open", () => ws.send(JSON.stringify({ cmd })));
    ws.addEventListener("message", (event) => {
      const msg = JSON.parse(event.data);
      if (msg.type === "stdout") appendOutput(msg.data);
      else if (msg.type === "stderr") appendOutput(msg.data, "stderr");
      else if (msg.type === "exit") {
        appendOutput(`\n[exit ${msg.exit_code} after ${msg.duration_s.toFixed(2)} s]`, "exit");
        $("exec-status").textContent = `exit ${msg.exit_code}`;
      } else if (msg.type === "error") {
        showError(`${msg.code}: ${msg.message}`);
        $("exec-status").textContent = "failed";
      }
    });
    ws.addEventListener("close", () => resolve());
    ws.addEventListener("error", () => {
      showError("the command stream failed: is the service still running?");
      resolve();
    });
  });
}

// --- snapshots and files ----------------------------------------------------------------------------
async function takeSnapshot() {
  const name = $("snapshot-name").value.trim();
  if (!selectedId || !name) {
    showError("select a sandbox and give the snapshot a name");
    return;
  }
  await api("POST", `/v1/sandboxes/${selectedId}/snapshots`, { name });
  await refresh();
}

function filesUrl(suffix, path) {
  return `/v1/sandboxes/${selectedId}/files${suffix}?path=${encodeURIComponent(path)}`;
}

async function listFiles() {
  const dir = $("files-path").value.trim() || "/home/user";
  const entries = await api("GET", filesUrl("", dir));
  const body = $("files").querySelector("tbody");
  body.replaceChildren();
  for (const f of entries) {
    const row = document.createElement("tr");
    cell(row, f.name, "name");
    cell(row, f.type);
    cell(row, f.type === "file" ? bytes(f.size) : "");
    cell(row, f.mode.toString(8));
    const actions = cell(row, "");
    if (f.type === "dir") {
      button(actions, "Open", "open", async () => { $("files-path").value = f.path; await listFiles(); });
    } else {
      button(actions, "Download", "download", () => download(f));
    }
    button(actions, "Rename", "rename", async () => {
      const dst = prompt(`rename ${f.path} to`, f.path);
      if (dst && dst !== f.path) {
        await api("POST", `/v1/sandboxes/${selectedId}/files/rename`, { src: f.path, dst });
        await listFiles();
      }
    });
    button(actions, "Remove", "remove", async () => { await api("DELETE", filesUrl("", f.path)); await listFiles(); });
    body.appendChild(row);
  }
}

async function download(f) {
  const blob = await api("GET", filesUrl("/content", f.path));
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = f.name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

async function makeDir() {
  const path = prompt("new directory", `${$("files-path").value.replace(/\/$/, "")}/new`);
  if (!path) return;
  await api("POST", `/v1/sandboxes/${selectedId}/files/mkdir`, { path });
  await listFiles();
}

async function upload() {
  const file = $("upload-file").files[0];
  if (!file) {
    showError("choose a file to upload");
    return;
  }
  const dir = ($("files-path").value.trim() || "/home/user").replace(/\/$/, "");
  await api("PUT", filesUrl("/content", `${dir}/${file.name}`), undefined, file);
  await listFiles();
}

// --- key and start-up ----------------------------------------------------------------------------
async function useKey(key) {
  sessionStorage.setItem(KEY, key);
  clearError();
  try {
    await refresh();
  } catch (err) {
    $("key-status").textContent = "key refused";
    $("app").hidden = true;
    stopPolling();
    return;
  }
  $("key-status").textContent = `key ${key.slice(0, 12)}...`;
  $("app").hidden = false;
  startPolling();
}

function startPolling() {
  stopPolling();
  pollTimer = setInterval(() => { refreshSandboxes().catch(() => stopPolling()); }, POLL_MS);
}

function stopPolling() {
  if (pollTimer !== null) clearInterval(pollTimer);
  pollTimer = null;
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", action(() => useKey($("api-key").value.trim())));
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    stopPolling();
    $("app").hidden = true;
    $("key-status").textContent = "no key";
    $("api-key").value = "";
  });
  $("error-close").addEventListener("click", clearError);
  $("create-form").addEventListener("submit", action(createSandbox));
  $("exec-form").addEventListener("submit", action(runCommand));
  $("snapshot-form").addEventListener("submit", action(takeSnapshot));
  $("files-form").addEventListener("submit", action(listFiles));
  $("files-mkdir").addEventListener("click", action(makeDir));
  $("upload-form").addEventListener("submit", action(upload));
  if (apiKey()) useKey(apiKey());
});
