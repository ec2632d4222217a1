// The job page: one JobView per visit. It owns the websocket, the last seq it
// applied, and the DOM of the live view.
//
// A job's events are applied exactly once: each one carries a gapless `seq`,
// the view remembers the last one it applied, and a reconnect asks the server
// for `after=<that seq>`; anything at or below it is ignored.

import { rememberWatchToken, watchToken } from "./auth.js";
import { $, announce, el, formatSeconds, linkify, showNotice } from "./dom.js";
import { EVENT_HANDLERS } from "./event-handlers.js";
import { FilesPanel } from "./files-panel.js";
import { api, apiUrl } from "./http.js";
import { LogPane } from "./log-pane.js";
import { MediaPane } from "./media-pane.js";
import { initialState, isTerminalState, isTerminalType, stateAfter } from "./meta.js";

const BACKOFF_FIRST = 250; // ms: first retry after a dropped connection
const BACKOFF_MAX = 5000; // ms: the retry delay doubles up to this

export class JobView {
  constructor(jobId, token) {
    this.jobId = jobId;
    this.token = token || watchToken(jobId);
    this.lastSeq = 0; // the highest seq applied; a reconnect asks for after=lastSeq
    this.state = initialState();
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
    $("cluster-stale").hidden = true;
    $("cancel-job").hidden = true;
    for (const id of ["output-panel", "progress-panel", "steps-panel", "result-panel", "logs-panel"]) {
      $(id).hidden = true;
    }
    for (const id of ["steps", "result", "events"]) $(id).replaceChildren();
    this.logs = new LogPane();
    this.files = new FilesPanel(this.jobId, () => this.token);
    if (this.media) this.media.close();
    this.media = new MediaPane();
    // The token text is ONE Text node that only ever grows (appendData): no
    // re-render, so selection, scrolling and screen readers stay put.
    this.text = document.createTextNode("");
    $("output").replaceChildren(this.text);
    this.setBadge(this.state);
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
    $("cancel-job").hidden = isTerminalState(state) || this.connection === "lost";
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
    const loaded = await this.loadRecord();
    if (loaded === "ok") this.files.load();
    if (!this.stopped && this.connection !== "lost") this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.tickTimer);
    this.media.close();
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

  // The state follows the server's state machine (meta.js): forward only.
  apply(event) {
    this.setState(stateAfter(this.state, event.type));
    this.listEvent(event);
    const handler = EVENT_HANDLERS[event.type];
    if (handler) handler(this, event);
    if (isTerminalType(event.type)) this.finish(event);
  }

  listEvent(event) {
    const chunk = event.type === "chunk" && event.data && typeof event.data === "object" ? event.data : null;
    const summary = chunk ? `${chunk.stream} #${chunk.index} ${chunk.media_type}`
      : typeof event.data === "string" ? event.data : JSON.stringify(event.data);
    // How the event reached the server when not over HTTP (docs/spool.md): a badge.
    const via = event.via === "spool"
      ? el("span", { className: "via", title: "read from the job's spool on the shared filesystem" }, "spool")
      : "";
    $("events").append(el("li", {}, el("code", {}, `#${event.seq} ${event.type}`), " ", via,
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

  showResult(data) {
    this.result = data;
    $("result").replaceChildren(...linkify(JSON.stringify(data, null, 2)));
    $("result-panel").hidden = false;
  }

  // The cluster stopped answering: the job runs on, but what this page shows of it may
  // be old until `recovered` (docs/clusters.md).
  showStale(data, time) {
    const cluster = data && typeof data.cluster === "string" ? data.cluster : "the cluster";
    const cause = data && typeof data.cause === "string" ? `: ${data.cause}` : "";
    const since = new Date(time * 1000).toLocaleTimeString();
    // A lost login is no failure of the cluster's: it waits for an operator.
    const what = data && data.state === "login_needed"
      ? `${cluster} has waited for an operator to log in since ${since}`
      : `${cluster} has not answered since ${since}${cause}`;
    $("cluster-stale-text").textContent = `${what}. The job runs on; its news may be old.`;
    $("cluster-stale").hidden = false;
  }

  hideStale() {
    $("cluster-stale").hidden = true;
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
    this.media.finish();
    const open = this.steps[this.steps.length - 1];
    if (open && !open.closed) this.closeStep(open, event.time);
    clearInterval(this.tickTimer);
    this.setConnection("ended");
    this.hideStale();
    $("cancel-job").hidden = true;
    if (!this.stopped) this.files.load(); // what the job left
    // apply() has moved the state already; the announcement adds the error, if any.
    const ended = this.state;
    announce($("job-error").hidden ? `Job ${ended}.` : `Job ${ended}: ${$("job-error-text").textContent}`);
  }
}
