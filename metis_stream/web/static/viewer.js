// metis-stream viewer: plain ES module, no build step, no external resources.
//
// Rules this file keeps (see docs/viewer.md):
// - Job data never goes through innerHTML: every value becomes a Text node or
//   an element property (textContent, href after a protocol check).
// - Every URL is relative to the page (document.baseURI), so the viewer also
//   works when a proxy serves the server under a sub-path.
// - A job's events are applied exactly once: each one carries a gapless `seq`,
//   the page remembers the last one it applied, and a reconnect asks the
//   server for `after=<that seq>`; anything at or below it is ignored.

const KEY_STORAGE = "metis-stream.api-key";
const TOKEN_STORAGE = "metis-stream.watch-tokens";
const BACKOFF_FIRST = 250; // ms: first retry after a dropped connection
const BACKOFF_MAX = 5000; // ms: the retry delay doubles up to this
const TERMINAL = new Set(["completed", "fatal", "cancelled"]);
const STATE_AFTER = {
  starting: "submitting", submitted: "queued", queued: "queued",
  completed: "completed", fatal: "failed", cancelled: "cancelled",
};
const STATE_RANK = { created: 0, submitting: 1, queued: 2, running: 3,
                     completed: 4, failed: 4, cancelled: 4 };

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------
// Small DOM helpers (text only: they never parse HTML)

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name in node) node[name] = value;
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function announce(message) {
  // Replacing the text of the live region makes screen readers read it once.
  $("announcer").textContent = message;
}

function showNotice(message, { auth = false } = {}) {
  const notice = $("notice");
  notice.textContent = message;
  notice.hidden = false;
  if (auth) {
    // A 401 is fixed in the key box: open it and put the cursor there.
    $("key-box").open = true;
    $("api-key").focus();
  }
}

function clearNotice() {
  $("notice").hidden = true;
  $("notice").textContent = "";
}

function formatSeconds(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) seconds = 0;
  if (seconds < 10) return `${seconds.toFixed(2)} s`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${Math.round(seconds - minutes * 60)} s`;
}

function formatTime(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleString();
}

// ---------------------------------------------------------------------------
// API key and watch tokens

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

// Watch tokens let a websocket (which cannot send an Authorization header)
// watch one job. They come with the job record; sessionStorage keeps them
// across a reload of the job page.
function rememberWatchToken(job) {
  if (!job || !job.id || !job.watch_token) return;
  const tokens = JSON.parse(sessionStorage.getItem(TOKEN_STORAGE) || "{}");
  tokens[job.id] = job.watch_token;
  sessionStorage.setItem(TOKEN_STORAGE, JSON.stringify(tokens));
}

function watchToken(jobId) {
  const tokens = JSON.parse(sessionStorage.getItem(TOKEN_STORAGE) || "{}");
  return tokens[jobId] || "";
}

function setupKeyForm() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("key-box").open = false;
    clearNotice();
    announce("API key saved.");
    route(); // retry whatever the page was showing, now with the key
  });
  $("key-clear").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    announce("API key forgotten.");
  });
}

// ---------------------------------------------------------------------------
// HTTP

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

function apiUrl(path, query = {}) {
  const url = new URL(path, document.baseURI);
  for (const [name, value] of Object.entries(query)) {
    if (value !== "" && value !== undefined && value !== null) url.searchParams.set(name, value);
  }
  return url;
}

// fetch + JSON + Bearer key. A 401 also raises the "needs an API key" notice,
// so every caller gets the same clear message.
async function api(path, { method = "GET", body, query } = {}) {
  const headers = { Accept: "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(apiUrl(path, query), {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    payload = null;
  }
  if (response.status === 401) {
    showNotice(key
      ? "The server refused the API key. Check it in the “API key” box above."
      : "This server needs an API key. Enter it in the “API key” box above.", { auth: true });
  }
  if (!response.ok) throw new ApiError(response.status, payload);
  return payload;
}

// ---------------------------------------------------------------------------
// Routing: #/ is the home page, #/jobs/<id> a job. The hash keeps a job page
// linkable and lets it survive a reload (the server never sees the fragment).

let currentJobView = null;

function parseRoute() {
  const match = /^#\/jobs\/([^/?]+)(?:\?(.*))?$/.exec(location.hash);
  if (!match) return { page: "home" };
  const query = new URLSearchParams(match[2] || "");
  return { page: "job", jobId: decodeURIComponent(match[1]), token: query.get("token") || "" };
}

function route() {
  const where = parseRoute();
  if (currentJobView) {
    currentJobView.stop();
    currentJobView = null;
  }
  clearNotice();
  $("home-view").hidden = where.page !== "home";
  $("job-view").hidden = where.page !== "job";
  if (where.page === "home") {
    document.title = "metis-stream";
    loadTemplates();
    loadJobs();
  } else {
    document.title = `Job ${where.jobId} · metis-stream`;
    currentJobView = new JobView(where.jobId, where.token);
    currentJobView.start();
  }
}

// ---------------------------------------------------------------------------
// Templates and the submit form

let templates = [];

async function loadTemplates() {
  const status = $("templates-status");
  try {
    templates = (await api("api/templates")).templates || [];
  } catch (error) {
    status.textContent = `Could not load the templates: ${error.message}`;
    return;
  }
  if (templates.length === 0) {
    status.textContent = "The server offers no templates.";
    return;
  }
  status.hidden = true;
  renderTemplateChoice();
  $("submit-form").hidden = false;
}

function renderTemplateChoice() {
  const box = $("template-choice");
  const chosen = box.querySelector("input:checked")?.value || templates[0].name;
  box.replaceChildren(el("legend", {}, "Template"));
  for (const template of templates) {
    const id = `template-${template.name}`;
    const radio = el("input", { type: "radio", name: "template", id, value: template.name,
                                checked: template.name === chosen });
    radio.addEventListener("change", renderParams);
    box.append(el("div", { className: "choice" }, radio,
      el("label", { htmlFor: id }, el("strong", {}, template.name),
        template.description ? el("span", { className: "muted" }, ` — ${template.description}`) : null)));
  }
  renderParams();
}

function selectedTemplate() {
  const name = $("template-choice").querySelector("input:checked")?.value;
  return templates.find((t) => t.name === name) || templates[0];
}

function renderParams() {
  const template = selectedTemplate();
  const box = $("params");
  box.replaceChildren(...template.params.map(paramField));
  $("inputs-box").hidden = !template.accepts_inputs;
  $("inputs-list").replaceChildren();
  $("submit-error").hidden = true;
}

// One form field per parameter, typed by the parameter's type, default filled.
function paramField(param) {
  const id = `param-${param.name}`;
  const input = paramInput(param, id);
  input.dataset.param = param.name;
  input.dataset.type = param.type;
  const hint = param.description ? el("p", { className: "hint", id: `${id}-hint` }, param.description) : null;
  const error = el("p", { className: "field-error", id: `${id}-error`, hidden: true });
  input.setAttribute("aria-describedby", [hint && hint.id, error.id].filter(Boolean).join(" "));
  const label = el("label", { htmlFor: id }, param.name, param.required ? " (required)" : "");
  if (param.type === "bool") {
    return el("div", { className: "field field-check" }, input, label, hint, error);
  }
  return el("div", { className: "field" }, label, input, hint, error);
}

function paramInput(param, id) {
  const has = (key) => param[key] !== undefined && param[key] !== null;
  switch (param.type) {
    case "bool":
      return el("input", { type: "checkbox", id, checked: param.default === true });
    case "choice": {
      const select = el("select", { id, required: param.required });
      if (!param.required && !has("default")) select.append(el("option", { value: "" }, "—"));
      for (const choice of param.choices || []) {
        select.append(el("option", { value: choice, selected: choice === param.default }, choice));
      }
      return select;
    }
    case "int":
    case "float": {
      const input = el("input", { type: "number", id, required: param.required,
                                  step: param.type === "int" ? "1" : "any", inputMode: param.type === "int" ? "numeric" : "decimal" });
      if (has("min")) input.min = String(param.min);
      if (has("max")) input.max = String(param.max);
      if (has("default")) input.value = String(param.default);
      return input;
    }
    default: {
      // str and url. A long free text gets a textarea (no pattern support there).
      const long = param.type === "str" && !param.pattern && (param.max_length || 1000) > 200;
      const input = long
        ? el("textarea", { id, rows: 3, required: param.required })
        : el("input", { id, type: param.type === "url" ? "url" : "text", required: param.required,
                        spellcheck: param.type !== "url" });
      if (has("max_length")) input.maxLength = param.max_length;
      if (has("pattern") && !long) input.pattern = param.pattern;
      if (param.type === "url") input.placeholder = "https://…";
      if (has("default")) input.value = String(param.default);
      return input;
    }
  }
}

function addInputRow(value = "") {
  const list = $("inputs-list");
  const index = list.children.length + 1;
  const id = `input-url-${Date.now()}-${index}`;
  const input = el("input", { type: "url", id, value, placeholder: "https://…", className: "input-url" });
  const remove = el("button", { type: "button", className: "secondary" }, "Remove");
  const row = el("li", {}, el("label", { htmlFor: id, className: "visually-hidden" }, `Input URL ${index}`), input, remove);
  remove.setAttribute("aria-label", `Remove input URL ${index}`);
  remove.addEventListener("click", () => { row.remove(); $("add-input").focus(); });
  list.append(row);
  input.focus();
}

// The form's values as the API wants them: numbers as numbers, empty optional
// fields left out (the server fills in defaults).
function collectParams() {
  const params = {};
  for (const input of $("params").querySelectorAll("[data-param]")) {
    const { param: name, type } = input.dataset;
    if (type === "bool") params[name] = input.checked;
    else if (input.value.trim() === "") continue;
    else if (type === "int") params[name] = Number.parseInt(input.value, 10);
    else if (type === "float") params[name] = Number(input.value);
    else params[name] = input.value;
  }
  return params;
}

function collectInputs() {
  return [...$("inputs-list").querySelectorAll("input")].map((i) => i.value.trim()).filter(Boolean);
}

function showFieldProblems(problems) {
  for (const node of $("submit-form").querySelectorAll(".field-error")) {
    node.hidden = true;
    node.textContent = "";
  }
  for (const input of $("submit-form").querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  let first = null;
  for (const [name, problem] of Object.entries(problems || {})) {
    const input = $(`param-${name}`);
    const error = $(`param-${name}-error`);
    if (!input || !error) continue;
    error.textContent = `${name}: ${problem}`;
    error.hidden = false;
    input.setAttribute("aria-invalid", "true");
    first = first || input;
  }
  return first;
}

// Submitting: POST /api/jobs, then open the job page, which watches
// WS /ws/jobs/{id}?after=0. We do not use WS /ws/jobs (submit over the
// socket) because (1) a browser cannot send the API key on a websocket, and
// /ws/jobs requires one when keys are configured; (2) POST returns the job's
// id and watch token before any event, so the page is linkable at once and
// a first connection and a reconnection are the very same code path.
async function submitJob(event) {
  event.preventDefault();
  const template = selectedTemplate();
  const button = $("submit-button");
  const errorBox = $("submit-error");
  errorBox.hidden = true;
  showFieldProblems({});
  button.disabled = true;
  try {
    const job = await api("api/jobs", { method: "POST", body: {
      template: template.name, params: collectParams(), inputs: collectInputs() } });
    rememberWatchToken(job);
    location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
  } catch (error) {
    errorBox.textContent = `Not submitted: ${error.message}`;
    errorBox.hidden = false;
    const first = showFieldProblems(error.body && error.body.problems);
    (first || errorBox).focus?.();
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------------------
// Jobs list

function badge(state) {
  return el("span", { className: "badge", dataset: { state } }, state);
}

async function loadJobs() {
  const status = $("jobs-status");
  status.textContent = "Loading…";
  let jobs;
  try {
    jobs = (await api("api/jobs")).jobs || [];
  } catch (error) {
    status.textContent = `Could not load the jobs: ${error.message}`;
    return;
  }
  jobs.sort((a, b) => b.created - a.created);
  jobs.forEach(rememberWatchToken);
  status.textContent = jobs.length ? `${jobs.length} job(s), newest first.` : "No jobs yet.";
  $("jobs-list").replaceChildren(...jobs.map((job) => el("li", {},
    el("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, className: "job-link" },
      el("strong", {}, job.template), " ", el("code", {}, job.id)),
    badge(job.state),
    el("span", { className: "muted" }, formatTime(job.created)))));
}

// ---------------------------------------------------------------------------
// The job page: one JobView per visit. It owns the websocket, the last seq it
// applied, and the DOM of the live view.

class JobView {
  constructor(jobId, token) {
    this.jobId = jobId;
    this.token = token || watchToken(jobId);
    this.lastSeq = 0; // the highest seq applied; a reconnect asks for after=lastSeq
    this.state = "created";
    this.ended = false; // a terminal event was applied
    this.stopped = false; // the user left the page: never reconnect
    this.socket = null;
    this.backoff = BACKOFF_FIRST;
    this.retryTimer = null;
    this.tickTimer = null;
    this.steps = []; // {name, time, durationNode}
    this.result = undefined;
    this.resetDom();
  }

  // -- DOM ------------------------------------------------------------------

  resetDom() {
    $("job-id").textContent = this.jobId;
    $("job-template").textContent = "—";
    $("job-scheduler-id").textContent = "—";
    $("job-seq").textContent = "0";
    $("job-error").hidden = true;
    $("cancel-job").hidden = true;
    for (const id of ["output-panel", "progress-panel", "steps-panel", "chunks-panel", "result-panel", "logs-panel"]) {
      $(id).hidden = true;
    }
    for (const id of ["steps", "chunks", "result", "logs", "events"]) $(id).replaceChildren();
    // The token text is ONE Text node that only ever grows (appendData): no
    // re-render, so selection, scrolling and screen readers stay put.
    this.text = document.createTextNode("");
    $("output").replaceChildren(this.text);
    this.setBadge("created");
    $("cancel-job").onclick = () => this.cancel();
  }

  setBadge(state) {
    const node = $("job-state");
    node.textContent = state;
    node.dataset.state = state;
  }

  setState(state, { quiet = false } = {}) {
    if (state === this.state) return;
    this.state = state;
    this.setBadge(state);
    $("cancel-job").hidden = STATE_RANK[state] >= 4 || this.connection === "lost";
    if (!quiet) announce(`Job ${state}.`);
  }

  setConnection(status, detail = "") {
    const node = $("connection");
    const changed = this.connection !== status;
    this.connection = status;
    node.dataset.conn = status;
    node.textContent = detail ? `${status} — ${detail}` : status;
    if (changed && status !== "connecting") announce(`Connection ${status}.`);
  }

  // -- lifecycle ------------------------------------------------------------

  async start() {
    this.setConnection("connecting");
    await this.loadRecord();
    if (!this.stopped && this.connection !== "lost") this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.tickTimer);
    if (this.socket) this.socket.close(1000, "page left");
  }

  // The job record gives the header facts and, for an API-key holder, the
  // watch token that the websocket needs when the server has keys.
  async loadRecord() {
    try {
      const job = await api(`api/jobs/${encodeURIComponent(this.jobId)}`, { query: { token: this.token } });
      rememberWatchToken(job);
      if (job.watch_token) this.token = job.watch_token;
      if (this.stopped) return "stopped";
      $("job-template").textContent = job.template;
      if (job.scheduler_id) $("job-scheduler-id").textContent = job.scheduler_id;
      return "ok";
    } catch (error) {
      if (error.status === 404) this.markLost();
      else if (error.status === 401) this.markUnauthorized();
      // Anything else (server down, 503): the websocket retries on its own.
      return error.status || "network";
    }
  }

  markLost() {
    if (this.stopped) return; // a late answer for a page the user has left
    clearTimeout(this.retryTimer);
    this.setConnection("lost", "the server does not know this job");
    showNotice("Unknown job: the server does not know this job. It may never have existed, "
      + "or it was lost when the server restarted (the memory backend keeps no history).");
    $("cancel-job").hidden = true;
    clearInterval(this.tickTimer);
    // Whatever state the page last saw is stale now: say so instead.
    const badge = $("job-state");
    badge.textContent = "unknown";
    badge.dataset.state = "lost";
    const open = this.steps[this.steps.length - 1];
    if (open && !open.closed) open.duration.textContent = "unknown (job lost)";
  }

  markUnauthorized() {
    if (this.stopped) return;
    clearTimeout(this.retryTimer);
    this.setConnection("ended", "not allowed: an API key is needed");
    showNotice("This job needs an API key (or a link with its watch token). "
      + "Enter the key in the “API key” box above.", { auth: true });
  }

  // -- the websocket ----------------------------------------------------------

  socketUrl() {
    const url = apiUrl(`ws/jobs/${encodeURIComponent(this.jobId)}`, {
      after: String(this.lastSeq), token: this.token });
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }

  connect() {
    if (this.stopped || this.ended) return;
    const socket = new WebSocket(this.socketUrl());
    this.socket = socket;
    this.opened = false;
    this.closeError = "";
    socket.onopen = () => {
      this.opened = true;
      this.backoff = BACKOFF_FIRST;
      this.setConnection("live");
    };
    socket.onmessage = (message) => this.onFrame(socket, message.data);
    socket.onclose = (close) => {
      if (this.socket === socket) this.socket = null;
      this.onClose(close.code);
    };
  }

  onFrame(socket, raw) {
    if (this.stopped) return;
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch {
      return; // not ours to understand; the seq bookkeeping is untouched
    }
    if (!frame || typeof frame.seq !== "number") {
      this.closeError = (frame && frame.error) || ""; // sent just before a 4xxx close
      return;
    }
    if (frame.seq <= this.lastSeq) return; // seen already (a replay overlap)
    if (frame.seq !== this.lastSeq + 1) {
      // A gap would lose events: drop this socket and resume from what we have.
      console.warn(`metis-stream: expected seq ${this.lastSeq + 1}, got ${frame.seq}; resuming`);
      socket.close(4000, "gap");
      return;
    }
    this.lastSeq = frame.seq;
    $("job-seq").textContent = String(frame.seq);
    this.apply(frame);
  }

  onClose(code) {
    if (this.stopped) return;
    if (this.ended) {
      this.setConnection("ended");
      return;
    }
    if (code === 4404) return this.markLost();
    if (code === 4401 || code === 4403) return this.markUnauthorized();
    if (code >= 4000 && code < 5000 && code !== 4000 && code !== 4408 && code !== 4429) {
      // A client error that retrying cannot fix (bad request, log lost, ...).
      this.setConnection("ended", this.closeError || `closed with code ${code}`);
      showNotice(`The server stopped this stream: ${this.closeError || `code ${code}`}.`);
      return;
    }
    if (!this.opened) {
      // A refused handshake looks like 1006 to a page; ask HTTP for the reason.
      this.probeThenRetry();
      return;
    }
    this.scheduleRetry();
  }

  async probeThenRetry() {
    const outcome = await this.loadRecord();
    if (this.stopped || outcome === 404 || outcome === 401) return;
    this.scheduleRetry();
  }

  scheduleRetry() {
    if (this.stopped || this.ended) return;
    const delay = this.backoff;
    this.backoff = Math.min(this.backoff * 2, BACKOFF_MAX);
    this.setConnection("reconnecting", `retrying in ${formatSeconds(delay / 1000)}`);
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  // A test hook (and a debugging aid): drop the socket as a network would.
  dropConnection() {
    if (this.socket) this.socket.close(4000, "dropped on purpose");
  }

  async cancel() {
    $("cancel-job").disabled = true;
    try {
      await api(`api/jobs/${encodeURIComponent(this.jobId)}`, { method: "DELETE" });
    } catch (error) {
      showNotice(`Could not cancel: ${error.message}`);
    } finally {
      $("cancel-job").disabled = false;
    }
  }

  // -- events -----------------------------------------------------------------

  apply(event) {
    const next = STATE_AFTER[event.type] || "running";
    if (STATE_RANK[next] > STATE_RANK[this.state]) this.setState(next);
    this.listEvent(event);
    const handler = EVENT_HANDLERS[event.type];
    if (handler) handler(this, event);
    if (TERMINAL.has(event.type)) this.finish(event);
  }

  listEvent(event) {
    const summary = typeof event.data === "string" ? event.data : JSON.stringify(event.data);
    $("events").append(el("li", {}, el("code", {}, `#${event.seq} ${event.type}`), " ",
      summary === undefined || summary === "null" ? "" : summary.slice(0, 200)));
  }

  appendToken(piece) {
    $("output-panel").hidden = false;
    this.text.appendData(piece);
  }

  addStep(name, time) {
    const previous = this.steps[this.steps.length - 1];
    if (previous) this.closeStep(previous, time);
    const duration = el("span", { className: "duration" }, "running…");
    const item = el("li", { className: "step current" }, el("span", { className: "step-name" }, name),
      duration);
    $("steps").append(item);
    $("steps-panel").hidden = false;
    this.steps.push({ name, time, item, duration, closed: false });
    this.startTicking();
  }

  closeStep(step, endTime) {
    step.closed = true;
    step.item.classList.remove("current");
    step.duration.textContent = formatSeconds(endTime - step.time);
  }

  // The current step shows its elapsed time until the next step or the end.
  startTicking() {
    if (this.tickTimer || this.ended) return;
    this.tickTimer = setInterval(() => {
      const step = this.steps[this.steps.length - 1];
      if (step && !step.closed) {
        step.duration.textContent = `${formatSeconds(Date.now() / 1000 - step.time)} so far`;
      }
    }, 1000);
  }

  setProgress(data) {
    if (!data || typeof data !== "object") return;
    const current = Number(data.current);
    const total = Number(data.total);
    const bar = $("progress-bar");
    $("progress-panel").hidden = false;
    if (Number.isFinite(total) && total > 0 && Number.isFinite(current)) {
      bar.max = total;
      bar.value = Math.min(Math.max(current, 0), total);
    } else {
      bar.removeAttribute("value"); // indeterminate
    }
    const percent = total > 0 ? ` (${Math.round((100 * current) / total)}%)` : "";
    const label = data.label ? `${data.label}: ` : "";
    $("progress-text").textContent = `${label}${current} / ${total}${percent}`;
    bar.setAttribute("aria-valuetext", $("progress-text").textContent);
  }

  addChunk(data) {
    const kind = data === null ? "null" : Array.isArray(data) ? "array" : typeof data;
    const body = kind === "string" ? data : JSON.stringify(data, null, 2);
    $("chunks").append(el("li", { dataset: { kind } },
      el("span", { className: "chunk-kind" }, kind), el("pre", {}, body)));
    $("chunks-panel").hidden = false;
  }

  addLog(data) {
    const line = typeof data === "string" ? data : JSON.stringify(data);
    $("logs").append(document.createTextNode(`${line}\n`));
    $("logs-panel").hidden = false;
  }

  showResult(data) {
    this.result = data;
    $("result").replaceChildren(...linkify(JSON.stringify(data, null, 2)));
    $("result-panel").hidden = false;
  }

  showError(data) {
    let message = data;
    let exitStatus = null;
    if (data && typeof data === "object") {
      message = data.error || data.message || JSON.stringify(data);
      exitStatus = Number.isInteger(data.exit_status) ? data.exit_status : null;
    }
    $("job-error-text").textContent = String(message ?? "");
    $("job-exit-status").textContent = exitStatus === null ? "" : `(exit status ${exitStatus})`;
    $("job-error").hidden = false;
  }

  finish(event) {
    this.ended = true;
    const open = this.steps[this.steps.length - 1];
    if (open && !open.closed) this.closeStep(open, event.time);
    clearInterval(this.tickTimer);
    this.setConnection("ended");
    $("cancel-job").hidden = true;
    const ended = STATE_AFTER[event.type];
    this.setState(ended, { quiet: true });
    announce(ended === "completed" ? "Job completed." : `Job ${ended}: ${$("job-error-text").textContent}`);
  }
}

// What each event type does to the page. Unknown types only appear in the
// "All events" list, so a new type never breaks the viewer.
const EVENT_HANDLERS = {
  submitted: (view, e) => { $("job-scheduler-id").textContent = String(e.data ?? "—"); },
  step: (view, e) => view.addStep(typeof e.data === "string" ? e.data : JSON.stringify(e.data), e.time),
  progress: (view, e) => view.setProgress(e.data),
  token: (view, e) => view.appendToken(typeof e.data === "string" ? e.data : String(e.data ?? "")),
  chunk: (view, e) => view.addChunk(e.data),
  log: (view, e) => view.addLog(e.data),
  result: (view, e) => view.showResult(e.data),
  completed: (view, e) => { if (e.data !== null && e.data !== undefined) view.showResult(e.data); },
  fatal: (view, e) => view.showError(e.data),
  cancelled: (view, e) => view.showError(e.data ?? "cancelled"),
};

// Text -> nodes, with http(s) URLs as links. The link's href is set as a
// property only after URL() parsed it and its protocol is http or https, so a
// job cannot smuggle `javascript:` or markup into the page.
function linkify(text) {
  const nodes = [];
  const pattern = /https?:\/\/[^\s"'<>\\]+/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    let href;
    try {
      href = new URL(match[0]);
    } catch {
      continue;
    }
    if (href.protocol !== "http:" && href.protocol !== "https:") continue;
    nodes.push(document.createTextNode(text.slice(last, match.index)));
    nodes.push(el("a", { href: href.href, rel: "noopener noreferrer nofollow" }, match[0]));
    last = match.index + match[0].length;
  }
  nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

// ---------------------------------------------------------------------------
// Start-up

// The hook the browser tests use to drop a socket mid-stream; harmless in use.
window.__metisViewer = {
  dropConnection: () => currentJobView?.dropConnection(),
  state: () => currentJobView && {
    jobId: currentJobView.jobId, lastSeq: currentJobView.lastSeq,
    state: currentJobView.state, connection: currentJobView.connection,
  },
};

function init() {
  setupKeyForm();
  $("submit-form").addEventListener("submit", submitJob);
  $("add-input").addEventListener("click", () => addInputRow());
  $("refresh-jobs").addEventListener("click", loadJobs);
  window.addEventListener("hashchange", () => {
    route();
    $("main").focus({ preventScroll: true }); // move keyboard focus to the new page
  });
  route();
}

init();
