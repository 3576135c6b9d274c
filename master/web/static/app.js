// fleetbus status page. Read-only; no build step, no outside assets.
// Everything shown may be attacker-chosen (job output, labels, user names): the DOM is
// built with createElement and textContent only, never innerHTML.
"use strict";

const PAGE = 50;
const state = {
  tab: "jobs",
  offsets: { agents: 0, jobs: 0, audit: [0] },
  job: null,
};

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key === "title") node.title = value;
    else if (key === "onclick") node.addEventListener("click", value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

async function getJSON(path, params) {
  const url = new URL(path, location.href);
  for (const [k, v] of Object.entries(params || {})) if (v !== "" && v !== undefined) url.searchParams.set(k, v);
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error(path + ": " + response.status + " " + (await response.text()));
  return response.json();
}

function formValues(id) {
  const out = {};
  for (const field of document.getElementById(id).elements) if (field.name) out[field.name] = field.value.trim();
  return out;
}

function when(iso) {
  return iso ? iso.replace("T", " ").replace(/\.\d+Z$/, "Z") : "";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  return seconds < 60 ? seconds.toFixed(2) + " s" : (seconds / 60).toFixed(1) + " min";
}

function mark(verified, problem) {
  return el("span", { class: verified ? "ok" : "bad", title: problem || "signature verified" }, verified ? "✓" : "✗");
}

// --- summary and live updates ---------------------------------------------------------

function showSummary(s) {
  const node = document.getElementById("summary");
  node.textContent = `${s.online}/${s.agents} agents online · ${s.jobs} jobs · seq ${s.seq}` +
    (s.target ? ` · target ${s.target}` : "") + (s.ready ? "" : " · catching up");
}

function connect() {
  const live = document.getElementById("live");
  const source = new EventSource("/api/stream");
  source.onopen = () => { live.className = "on"; };
  source.onerror = () => { live.className = "off"; };
  source.addEventListener("job", (e) => liveJob(JSON.parse(e.data)));
  source.addEventListener("agent", (e) => liveAgent(JSON.parse(e.data)));
  source.addEventListener("rollout", (e) => { if (state.tab === "rollouts") loadRollouts(); });
  source.addEventListener("summary", (e) => showSummary(JSON.parse(e.data)));
  source.addEventListener("reset", () => { source.close(); reload(); setTimeout(connect, 1000); });
}

// --- jobs -----------------------------------------------------------------------------

function jobMatches(job, filters) {
  if (filters.agent && job.agent !== filters.agent) return false;
  if (filters.status && job.status !== filters.status) return false;
  if (filters.user && ![job.submitted_by, job.run_as, job.effective_user].includes(filters.user)) return false;
  return true;
}

function jobRow(job) {
  const row = el("tr", { "data-job": job.job_id, class: "status-" + job.status },
    el("td", {}, el("a", { onclick: () => showJob(job.job_id) }, job.job_id)),
    el("td", {}, job.agent),
    el("td", { class: "status" }, job.status),
    el("td", {}, job.exit_code ?? ""),
    el("td", {}, job.submitted_by || ""),
    el("td", { class: "command" }, job.command || ""),
    el("td", {}, when(job.submitted_at)),
    el("td", {}, duration(job.duration_s)));
  return row;
}

function liveJob(job) {
  const body = document.getElementById("jobs");
  const old = body.querySelector(`tr[data-job="${CSS.escape(job.job_id)}"]`);
  const filters = formValues("job-filters");
  if (old) {
    if (jobMatches(job, filters)) old.replaceWith(jobRow(job));
    else old.remove();
  } else if (state.offsets.jobs === 0 && jobMatches(job, filters)) {
    body.prepend(jobRow(job));
    while (body.rows.length > PAGE) { body.deleteRow(-1); state.jobsMore = true; }
    pager("jobs", 0, state.jobsMore, undefined, body.rows.length);
  }
  if (state.job === job.job_id) showJob(job.job_id);
}

async function loadJobs() {
  const page = await getJSON("/api/jobs", { ...formValues("job-filters"), offset: state.offsets.jobs, limit: PAGE });
  const body = document.getElementById("jobs");
  clear(body);
  for (const job of page.items) body.append(jobRow(job));
  state.jobsMore = page.more;
  pager("jobs", state.offsets.jobs, page.more, undefined, page.items.length);
}

async function showJob(id) {
  state.job = id;
  const doc = await getJSON("/api/job", { id });
  const job = doc.job;
  document.getElementById("job-detail").hidden = false;
  document.getElementById("job-title").textContent = `job ${job.job_id} on ${job.agent}: ${job.status}`;
  const fields = document.getElementById("job-fields");
  clear(fields);
  for (const key of ["command", "submitted_by", "run_as", "effective_user", "exit_code", "signal", "reason", "submitted_at", "started_at", "finished_at", "duration_s"]) {
    if (job[key] === null || job[key] === undefined) continue;
    fields.append(el("dt", {}, key), el("dd", {}, job[key]));
  }
  const events = document.getElementById("job-events");
  clear(events);
  for (const e of doc.events) events.append(eventRow(e, false));
  const output = document.getElementById("job-output");
  clear(output);
  for (const chunk of doc.output.chunks) output.append(el("span", { class: chunk.stream }, chunk.text));
  if (!doc.output.chunks.length && job.output_tail) output.append(el("span", {}, job.output_tail));
}

function eventRow(e, withSubject) {
  return el("tr", {},
    el("td", {}, mark(e.verified, e.problem)),
    el("td", {}, e.seq),
    el("td", {}, when(e.time)),
    el("td", {}, e.type || "(undecodable)"),
    el("td", {}, e.source || ""),
    withSubject ? el("td", { class: "subject" }, e.subject) : null,
    el("td", { class: "problem" }, e.problem || "verified"));
}

// --- agents ---------------------------------------------------------------------------

function agentRow(a) {
  const labels = Object.entries(a.labels || {}).map(([k, v]) => el("span", { class: "label" }, `${k}=${v}`));
  return el("tr", { "data-agent": a.id, class: a.online ? "online" : "offline" },
    el("td", {}, a.id),
    el("td", {}, a.online ? "online" : "offline"),
    el("td", {}, a.version || ""),
    el("td", {}, a.update || ""),
    el("td", {}, ...labels),
    el("td", {}, (a.running || []).length),
    el("td", {}, when(a.last_seen)));
}

function liveAgent(a) {
  const old = document.querySelector(`#agents tr[data-agent="${CSS.escape(a.id)}"]`);
  if (old) old.replaceWith(agentRow(a));
}

async function loadAgents() {
  const page = await getJSON("/api/agents", { ...formValues("agent-filters"), offset: state.offsets.agents, limit: PAGE });
  const body = document.getElementById("agents");
  clear(body);
  for (const a of page.items) body.append(agentRow(a));
  pager("agents", state.offsets.agents, state.offsets.agents + PAGE < page.total, page.total, page.items.length);
}

// --- rollouts -------------------------------------------------------------------------

async function loadRollouts() {
  const doc = await getJSON("/api/rollouts");
  const box = document.getElementById("rollouts");
  clear(box);
  if (!doc.items.length) box.append(el("p", {}, "No release has been published."));
  for (const r of doc.items) {
    const c = r.counts || {};
    const applied = c.applied || 0;
    const bar = el("progress", {});
    bar.max = Math.max(1, r.fleet);
    bar.value = applied;
    const state = r.halted ? "halted: " + r.halted : r.target ? "target" : "";
    box.append(el("div", { class: "rollout" + (r.halted ? " halted" : "") },
      el("h3", {}, `${r.version} ${state}`),
      bar,
      el("p", {}, `canary ${r.canary} (${(r.canaries || []).join(", ")}) · applied ${applied}/${r.fleet} · ` +
        `downloading ${(c.token || 0) + (c.downloaded || 0)} · failed ${c.failed || 0} · ` +
        `rolled back ${c.rolled_back || 0} · failures ${r.failures} (halt after ${r.max_failures})`)));
  }
}

// --- audit ----------------------------------------------------------------------------

async function loadAudit() {
  const stack = state.offsets.audit;
  const before = stack[stack.length - 1];
  const page = await getJSON("/api/audit", { ...formValues("audit-filters"), before, limit: PAGE });
  const body = document.getElementById("audit");
  clear(body);
  for (const e of page.items) body.append(eventRow(e, true));
  state.auditNext = page.next_before;
  pager("audit", stack.length - 1, page.next_before > 0);
}

// --- paging and tabs ------------------------------------------------------------------

function pager(name, offset, more, total, shown) {
  const box = document.querySelector(`.pager[data-for="${name}"]`);
  const [back, label, next] = [box.children[0], box.children[1], box.children[2]];
  back.disabled = offset === 0;
  next.disabled = !more;
  label.textContent = name === "audit" ? `page ${offset + 1}` :
    (shown ? `${offset + 1}–${offset + shown}` : "none") + (total !== undefined ? ` of ${total}` : "");
}

function step(name, direction) {
  if (name === "audit") {
    if (direction > 0) state.offsets.audit.push(state.auditNext);
    else if (state.offsets.audit.length > 1) state.offsets.audit.pop();
  } else {
    state.offsets[name] = Math.max(0, state.offsets[name] + direction * PAGE);
  }
  reload();
}

function reload() {
  const load = { agents: loadAgents, jobs: loadJobs, rollouts: loadRollouts, audit: loadAudit }[state.tab];
  load().catch((err) => { document.getElementById("summary").textContent = String(err.message); });
  getJSON("/api/summary").then(showSummary).catch(() => {});
}

function show(tab) {
  state.tab = tab;
  for (const button of document.querySelectorAll("nav button")) button.classList.toggle("on", button.dataset.tab === tab);
  for (const section of document.querySelectorAll("main section")) section.hidden = section.id !== "tab-" + tab;
  reload();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("nav button")) button.addEventListener("click", () => show(button.dataset.tab));
  for (const box of document.querySelectorAll(".pager")) {
    for (const button of box.querySelectorAll("button")) button.addEventListener("click", () => step(box.dataset.for, Number(button.dataset.step)));
  }
  for (const form of document.querySelectorAll("form.filters")) {
    form.addEventListener("submit", (e) => e.preventDefault());
    form.addEventListener("change", () => { state.offsets.jobs = 0; state.offsets.agents = 0; state.offsets.audit = [0]; reload(); });
  }
  show(state.tab);
  connect();
});
