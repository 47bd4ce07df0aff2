// The Substantial web UI: a runs list and a run's timeline, read from the JSON API.
// Everything that comes from the store is put on the page as text (textContent or
// text nodes), never parsed as HTML; the server's Content-Security-Policy forbids
// inline scripts as a second line of defence.
"use strict";

const STATES = new Set([
  "active", "completed", "failed", "cancelled", "reverted", "continued", "timed_out",
  "corrupt", "ok", "running", "retrying", "waiting", "info",
]);
const LIST_FILTERS = ["status", "workflow", "parent", "queue", "id", "since", "until", "where", "sort", "reverse"];
const RESUMABLE = new Set(["failed", "cancelled", "timed_out"]);
let config = { actions: false, backend: "" };
let timer = null;
let views = 0; // counts the views drawn, so a late answer for an old one is dropped

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function stateClass(state) {
  return "st st-" + (STATES.has(state) ? state : "other");
}

function badge(state) {
  return el("span", { class: stateClass(state) }, state);
}

function runLink(id) {
  return el("a", { href: "#/run/" + encodeURIComponent(id), class: "runlink" }, id);
}

function json(value) {
  if (value === undefined) return "";
  try {
    return JSON.stringify(value);
  } catch (e) {
    return String(value);
  }
}

function errorText(error) {
  if (!error) return "";
  return typeof error === "object" ? `${error.type}: ${error.message}` : String(error);
}

function fmtDur(s) {
  s = Math.max(0, s);
  if (s < 1) return s < 0.01 ? (s * 1000).toFixed(1) + "ms" : Math.round(s * 1000) + "ms";
  if (s < 60) return s < 10 ? s.toFixed(2) + "s" : s.toFixed(1) + "s";
  let m = Math.floor(s / 60);
  if (m < 60) return `${m}m${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  let h = Math.floor(m / 60);
  if (h < 24) return `${h}h${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(h / 24)}d${String(h % 24).padStart(2, "0")}h`;
}

function fmtClock(ts, withDate) {
  const d = new Date(ts * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  return withDate ? `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}` : time;
}

function fmtAgo(ts, now) {
  const delta = now - ts;
  return delta >= 0 ? fmtDur(delta) + " ago" : "in " + fmtDur(-delta);
}

async function api(path, options) {
  const response = await fetch(path, { credentials: "same-origin", ...(options || {}) });
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = { error: `HTTP ${response.status}` };
  }
  if (!response.ok) throw new Error(body && body.error ? body.error : `HTTP ${response.status}`);
  return body;
}

function stopTimer() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}

function every(ms, fn) {
  stopTimer();
  timer = setInterval(() => {
    if (document.getElementById("live").checked) fn();
  }, ms);
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

function hashParams() {
  const hash = location.hash.replace(/^#\/?/, "");
  const query = hash.includes("?") ? hash.slice(hash.indexOf("?") + 1) : "";
  return new URLSearchParams(query);
}

// -- the runs list -------------------------------------------------------------

function listView() {
  const params = hashParams();
  const offset = Number(params.get("offset") || 0);
  const input = (name, placeholder, size) =>
    el("input", { name, placeholder, size: size || 14, value: params.get(name) || "" });
  const status = el("select", { name: "status" },
    ["", "active", "completed", "failed", "cancelled", "reverted", "continued", "timed_out", "corrupt"]
      .map((s) => el("option", { value: s, selected: params.get("status") === s }, s || "any status")));
  const sort = el("select", { name: "sort" },
    ["created", "updated", "id", "status", "workflow"]
      .map((s) => el("option", { value: s, selected: (params.get("sort") || "created") === s }, "sort: " + s)));
  const reverse = el("input", { type: "checkbox", name: "reverse", value: "1", checked: params.get("reverse") === "1" });
  const form = el("form", { id: "filters", class: "filters" },
    status, input("workflow", "workflow"), input("parent", "parent run"), input("queue", "queue", 10),
    input("id", "text in run id"),
    input("since", "since (15m, ISO)", 12), input("until", "until", 10),
    input("where", 'where {"contains": "fatal"}', 28), sort,
    el("label", {}, reverse, " reverse"), el("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const [key, value] of new FormData(form).entries()) if (value) next.set(key, value);
    location.hash = "#/?" + next.toString();
  });
  const results = el("div", { id: "results" });
  show(form, results);
  const refresh = async () => {
    const query = new URLSearchParams();
    for (const key of LIST_FILTERS) if (params.get(key)) query.set(key, params.get(key));
    if (params.get("before")) query.set("before", params.get("before"));
    else query.set("offset", String(offset));
    query.set("limit", "50");
    try {
      renderRuns(results, await api("/api/runs?" + query.toString()), params);
    } catch (e) {
      results.replaceChildren(el("p", { class: "error" }, e.message));
    }
  };
  refresh();
  every(2000, refresh);
}

function renderRuns(target, data, params) {
  if (!data.runs.length) {
    target.replaceChildren(el("p", { class: "muted" }, `no runs match (${data.scanned} read)`));
    return;
  }
  const rows = data.runs.map((run) => {
    const end = run.ended_at !== null ? run.ended_at : data.now;
    let outcome = "";
    if (run.status === "completed") outcome = json(run.output);
    else if (run.error) outcome = errorText(run.error);
    else if (run.note) outcome = run.note;
    return el("tr", { "data-run": run.run_id },
      el("td", {}, runLink(run.run_id)),
      el("td", {}, run.workflow),
      el("td", {}, badge(run.status)),
      el("td", { title: fmtClock(run.created_at, true) }, fmtAgo(run.created_at, data.now)),
      el("td", { class: "num" }, fmtDur(end - run.created_at)),
      el("td", {}, run.parent ? runLink(run.parent) : ""),
      el("td", { class: "outcome" }, outcome));
  });
  const table = el("table", { class: "runs" },
    el("thead", {}, el("tr", {}, ["run", "workflow", "status", "started", "took", "parent", "result / error / note"]
      .map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
  // Newest first the next page is asked for by a cursor (the last run shown), which costs a
  // page of reads however deep; "at" only numbers the rows.
  const skipped = params.get("before") ? Number(params.get("at") || 0) : data.offset;
  const first = skipped + 1;
  const last = skipped + data.runs.length;
  const page = (offset) => {
    const next = new URLSearchParams(params);
    next.delete("before");
    next.delete("at");
    next.set("offset", String(Math.max(0, offset)));
    return "#/?" + next.toString();
  };
  const after = () => {
    const next = new URLSearchParams(params);
    next.delete("offset");
    next.set("before", data.next_before.join(","));
    next.set("at", String(last));
    return "#/?" + next.toString();
  };
  let previous = "";
  if (params.get("before")) {
    previous = el("a", { href: "#", id: "previous" }, "← previous");
    previous.addEventListener("click", (event) => { event.preventDefault(); history.back(); });
  } else if (data.offset > 0) {
    previous = el("a", { href: page(data.offset - data.limit) }, "← previous");
  }
  let more = "";
  if (data.next_before) more = el("a", { href: after(), id: "next" }, "next →");
  else if (!params.get("before") && last < data.total) more = el("a", { href: page(last), id: "next" }, "next →");
  const total = params.get("before") ? "" : ` of ${data.total}${data.truncated ? "+" : ""}`;
  const pager = el("p", { class: "pager" }, previous, ` ${first}-${last}${total} runs `, more);
  target.replaceChildren(table, pager);
}

// -- one run -------------------------------------------------------------------

function runView(runId) {
  const view = views;
  const actions = el("div", { id: "actions" });
  const message = el("span", { class: "muted", id: "action-message" });
  const target = el("div", { id: "run" });
  show(el("p", {}, el("a", { href: "#/" }, "← all runs")), actions, target);
  let drawn = null; // which actions the panel shows: "steer", "resume" or none
  const refresh = async () => {
    try {
      const tl = await api("/api/runs/" + encodeURIComponent(runId));
      if (view !== views) return; // the page moved on while this was read
      renderRun(target, tl);
      let wanted = null;
      if (config.actions && tl.status === "active") wanted = "steer";
      else if (config.actions && RESUMABLE.has(tl.status)) wanted = "resume";
      if (wanted !== drawn) {
        drawn = wanted;
        const panel = wanted === "steer" ? steerPanel(runId, post)
          : wanted === "resume" ? resumePanel(runId, tl.status, post) : null;
        actions.replaceChildren(...(panel ? [panel] : []), message);
      }
      if (tl.status !== "active") stopTimer();
      else if (timer === null) every(1000, refresh);
    } catch (e) {
      if (view !== views) return;
      target.replaceChildren(el("p", { class: "error" }, e.message));
      stopTimer();
    }
  };
  const post = async (path, body, done) => {
    try {
      await api(path, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      message.textContent = done;
      await refresh();
    } catch (e) {
      message.textContent = e.message;
    }
  };
  refresh();
  every(1000, refresh);
}

// A button that asks for a second click before it acts.
function confirmButton(id, label, armed, act) {
  const button = el("button", { type: "button", id }, label);
  button.addEventListener("click", () => {
    if (button.dataset.armed !== "1") {
      button.dataset.armed = "1";
      button.textContent = armed;
      return;
    }
    button.disabled = true;
    Promise.resolve(act()).finally(() => {
      // Refused (the panel stays): ready for another go.
      button.disabled = false;
      button.dataset.armed = "";
      button.textContent = label;
    });
  });
  return button;
}

function steerPanel(runId, post) {
  const name = el("input", { name: "event-name", placeholder: "event name", size: 14 });
  const value = el("input", { name: "event-value", placeholder: "JSON value, e.g. 3", size: 24 });
  const path = (action) => `/api/runs/${encodeURIComponent(runId)}/${action}`;
  const send = el("form", { class: "actions", id: "send-event" }, name, value,
    el("button", { type: "submit" }, "Send event"));
  send.addEventListener("submit", (event) => {
    event.preventDefault();
    let parsed = null;
    if (value.value.trim()) {
      try {
        parsed = JSON.parse(value.value);
      } catch (e) {
        document.getElementById("action-message").textContent = "the value must be JSON: " + e.message;
        return;
      }
    }
    post(path("events"), { name: name.value, value: parsed }, "sent");
  });
  const cancel = confirmButton("cancel-run", "Cancel run", "Click again to cancel",
    () => post(path("cancel"), {}, "cancel requested"));
  return el("div", { class: "panel" }, send, cancel, " ");
}

function resumePanel(runId, status, post) {
  // A timed-out run needs a new deadline, or none; others may take one.
  const timeout = el("input", { name: "resume-timeout", placeholder: "new timeout, seconds (none)", size: 24 });
  const resume = confirmButton("resume-run", "Resume run", "Click again to resume", () => {
    const text = timeout.value.trim();
    // Not a number: sent as typed, for the server to say what it expects.
    const seconds = !text ? null : Number.isFinite(Number(text)) ? Number(text) : text;
    return post(`/api/runs/${encodeURIComponent(runId)}/resume`, { timeout: seconds },
      "resumed: its failed steps run again on the next worker");
  });
  return el("div", { class: "panel", id: "resume" },
    el("span", { class: "muted" }, `${status}: resume it after a fix `), timeout, " ", resume, " ");
}

function renderRun(target, tl) {
  const facts = el("dl", { class: "facts" });
  const fact = (label, ...value) => facts.append(el("dt", {}, label), el("dd", {}, ...value));
  fact("workflow", tl.workflow + (tl.version ? ` (version ${tl.version})` : ""));
  fact("status", badge(tl.status), ` ${tl.ended_at !== null ? "after" : "for"} ${fmtDur(tl.duration)}`);
  fact("started", fmtClock(tl.started_at, true));
  if (tl.ended_at !== null) fact("ended", fmtClock(tl.ended_at, true));
  if (tl.deadline) fact("deadline", fmtClock(tl.deadline, true));
  if (tl.parent) fact("parent", runLink(tl.parent));
  if (tl.next_run) fact("continued as", runLink(tl.next_run));
  if (tl.status === "completed") fact("result", el("code", {}, json(tl.value)));
  if (tl.error) fact("error", el("span", { class: "error" }, errorText(tl.error)));
  if (tl.waiting_for) fact("waiting for", tl.waiting_for);
  if (tl.status === "active") {
    const held = tl.lease && tl.lease.expires_at > tl.now;
    fact("held by", held ? tl.lease.owner : "no worker");
  }
  if (tl.pending_events) fact("inbox", `${tl.pending_events} event(s) not yet delivered`);
  const parts = [el("h1", {}, "run ", el("span", { class: "runid" }, tl.run_id)), facts, timelineView(tl)];
  if (Object.keys(tl.published).length) {
    parts.push(el("h2", {}, "Published values"), table(["key", "value"],
      Object.entries(tl.published).map(([key, value]) => [key, el("code", {}, json(value))]), "published"));
  }
  if (Object.keys(tl.streams).length) {
    parts.push(el("h2", {}, "Streams"), table(["stream", "values", "last"],
      Object.entries(tl.streams).map(([name, values]) => [name, String(values.length), el("code", {}, json(values[values.length - 1]))]), "streams"));
  }
  if (tl.children.length) {
    parts.push(el("h2", {}, "Children"), table(["run", "workflow", "status", "error"],
      tl.children.map((c) => [runLink(c.run_id), c.workflow, badge(c.status), errorText(c.error)]), "children"));
  }
  parts.push(el("h2", {}, "Records"), table(["pos", "kind", "record"],
    tl.records.map(({ position, record }) => [String(position), record.k, el("code", {}, json(record))]), "records"));
  for (const bad of tl.corrupt) parts.push(el("p", { class: "error" }, `position ${bad.position}: ${bad.error}`));
  target.replaceChildren(...parts);
}

function table(headers, rows, id) {
  return el("table", { class: "grid", id },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))));
}

function timelineView(tl) {
  const t0 = tl.started_at;
  const right = Math.max(tl.ended_at !== null ? tl.ended_at : tl.now, t0 + 0.001);
  const span = right - t0;
  const pct = (t) => Math.min(100, Math.max(0, ((t - t0) / span) * 100));
  const axis = el("div", { class: "axis" });
  for (let i = 0; i <= 4; i++) {
    const tick = el("span", { class: "tick" }, "+" + fmtDur((span * i) / 4));
    tick.style.left = (i * 25) + "%";
    axis.append(tick);
  }
  const rows = tl.rows.map((row) => {
    const track = el("div", { class: "track" });
    const title = `${row.label}\n+${fmtDur(row.start - t0)} at ${fmtClock(row.start)}`;
    if (row.bar) {
      let from = row.start;
      for (const attempt of row.attempts) {
        track.append(segment(pct(from), pct(attempt.retry_at), "seg failed",
          `attempt ${attempt.n} failed: ${errorText(attempt.error)}`));
        from = attempt.retry_at;
      }
      const end = row.end !== null ? row.end : right;
      const took = fmtDur(end - row.start) + (row.end === null ? "…" : "");
      track.append(segment(pct(from), pct(end), "seg " + stateClass(row.state), `${title}\ntook ${took}`));
    } else {
      const mark = el("span", { class: "mark " + stateClass(row.state), title });
      mark.style.left = pct(row.start) + "%";
      track.append(mark);
    }
    let detail = "";
    if (row.error) detail = errorText(row.error);
    else if (row.value !== null && row.value !== undefined) detail = json(row.value);
    else if (row.until) detail = "until " + fmtClock(row.until);
    const label = row.kind === "child" && row.run_id
      ? el("span", {}, "child ", runLink(row.run_id))
      : el("span", {}, row.label);
    return el("div", { class: "trow kind-" + (/^[a-z]+$/.test(row.kind) ? row.kind : "other") },
      el("div", { class: "tlabel", title: row.label }, label),
      track,
      el("div", { class: "tdetail", title: detail }, detail));
  });
  return el("div", { class: "timeline", id: "timeline" },
    el("div", { class: "trow head" }, el("div", { class: "tlabel" }, ""), axis, el("div", { class: "tdetail" }, "")),
    rows);
}

function segment(left, right, cls, title) {
  const node = el("span", { class: cls, title });
  node.style.left = left + "%";
  node.style.width = Math.max(right - left, 0.4) + "%";
  return node;
}

// -- live workers --------------------------------------------------------------

function workersView() {
  const view = views;
  const target = el("div", { id: "workers" });
  show(el("h1", {}, "Workers"),
    el("p", { class: "muted" }, "Workers that hold active runs now, from the runs' leases. " +
      "A worker that holds nothing leaves no trace in the store and is not listed."),
    target);
  const refresh = async () => {
    try {
      const data = await api("/api/workers");
      if (view === views) renderWorkers(target, data);
    } catch (e) {
      if (view === views) target.replaceChildren(el("p", { class: "error" }, e.message));
    }
  };
  refresh();
  every(2000, refresh);
}

function renderWorkers(target, data) {
  const parts = [];
  if (!data.workers.length) {
    parts.push(el("p", { class: "muted", id: "no-workers" }, "no worker holds an active run"));
  } else {
    const rows = data.workers.map((w) => {
      let ends = "in " + fmtDur(w.first_expiry - data.now);
      if (w.last_expiry - w.first_expiry > 1) ends += "–" + fmtDur(w.last_expiry - data.now);
      const held = [];
      w.runs.slice(0, 20).forEach((id, i) => held.push(i ? ", " : "", runLink(id)));
      if (w.runs.length > 20) held.push(` (+${w.runs.length - 20})`);
      return el("tr", { "data-owner": w.owner, class: w.gone ? "gone" : null },
        el("td", {}, w.host), el("td", {}, w.pid), el("td", { class: "num" }, String(w.runs.length)),
        el("td", {}, ends), el("td", {}, held), el("td", { class: "owner" }, w.owner));
    });
    parts.push(table(["host", "pid", "runs", "leases end", "holding", "owner"], [], "workers-table"));
    parts[0].querySelector("tbody").replaceChildren(...rows);
    if (data.workers.some((w) => w.gone)) {
      parts.push(el("p", { class: "error" }, "red: the process is gone; its runs are taken over"));
    }
  }
  if (data.expired.length) {
    const held = [];
    data.expired.slice(0, 20).forEach((lease, i) => held.push(i ? ", " : "", runLink(lease.run_id)));
    parts.push(el("p", { class: "muted", id: "expired" },
      `${data.expired.length} active run(s) with an expired lease, waiting for a worker: `, held));
  }
  target.replaceChildren(...parts);
}

// -- routing -------------------------------------------------------------------

function route() {
  stopTimer();
  views++;
  const hash = location.hash;
  if (hash.startsWith("#/run/")) runView(decodeURIComponent(hash.slice(6)));
  else if (hash === "#/workers") workersView();
  else listView();
}

async function start() {
  try {
    config = await api("/api/config");
    document.getElementById("store").textContent = config.backend + (config.actions ? " · actions allowed" : " · read-only");
  } catch (e) {
    show(el("p", { class: "error" }, e.message));
    return;
  }
  window.addEventListener("hashchange", route);
  route();
}

start();
