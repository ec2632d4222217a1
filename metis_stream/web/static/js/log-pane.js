// The job page's Logs pane: a job's `log` events as a terminal-like view.
//
// Each line is one element, marked with its stream (stdout, stderr, the
// launcher's notice, or a message the script posted itself); its ANSI colours
// are rendered by ansi.js, everything else in it is shown inertly. The pane
// follows the latest line while the reader is at the bottom, and stops
// following while they read further up. It keeps the last MAX_LINES lines, so
// that a job that prints without end cannot grow the page without end.

import { parseAnsi } from "./ansi.js";
import { $, el } from "./dom.js";

// Lines the pane keeps. The launcher's default budget (1 MiB of output) is some
// 20,000 lines; this many still scroll smoothly.
export const MAX_LINES = 10_000;

const STREAMS = new Set(["stdout", "stderr", "notice"]);

// Pixels from the bottom that still count as the bottom (fractional scroll positions).
const BOTTOM_SLACK = 8;

const KEYS_THAT_SCROLL_UP = new Set(["ArrowUp", "PageUp", "Home"]);

// A `log` event's data -> {stream, lines}. The launcher sends {stream, lines};
// `metis-emit log TEXT` sends a string (a "message"); any other value is shown
// as its JSON text.
function logLines(data) {
  if (data && typeof data === "object" && STREAMS.has(data.stream) && Array.isArray(data.lines)) {
    const lines = data.lines.map((line) => (typeof line === "string" ? line : JSON.stringify(line)));
    return { stream: data.stream, lines };
  }
  if (typeof data === "string") {
    const lines = data.split("\n");
    if (lines.length > 1 && lines[lines.length - 1] === "") lines.pop(); // a final newline ends the text
    return { stream: "message", lines };
  }
  return { stream: "message", lines: [JSON.stringify(data ?? null)] };
}

function lineElement(stream, text) {
  const line = el("div", { className: "log-line", dataset: { stream } });
  for (const segment of parseAnsi(text)) {
    if (segment.control) {
      const title = `control character ${segment.control}`;
      line.append(el("span", { className: segment.classes.join(" "), title }, segment.text));
    } else if (segment.classes.length) {
      line.append(el("span", { className: segment.classes.join(" ") }, segment.text));
    } else {
      line.append(segment.text);
    }
  }
  return line;
}

export class LogPane {
  constructor() {
    this.panel = $("logs-panel");
    this.pane = $("logs");
    this.latest = $("logs-latest");
    this.droppedNote = $("logs-dropped");
    this.following = true;
    this.scrollPending = false;
    this.lastScrollTop = 0;
    this.dropped = 0;
    this.pane.replaceChildren();
    this.latest.hidden = true;
    this.droppedNote.hidden = true;
    // Properties, not addEventListener: the next job page's pane replaces them.
    this.pane.onscroll = () => this.onScroll();
    // A wheel turn or a key up stops following at once: a line arriving before
    // the scroll event would otherwise pull the reader back down.
    this.pane.onwheel = (wheel) => {
      if (wheel.deltaY < 0 && this.pane.scrollTop > 0) this.setFollowing(false);
    };
    this.pane.onkeydown = (key) => {
      if (KEYS_THAT_SCROLL_UP.has(key.key) && this.pane.scrollTop > 0) this.setFollowing(false);
    };
    this.latest.onclick = () => {
      this.setFollowing(true);
      this.pane.scrollTop = this.pane.scrollHeight;
      this.pane.focus({ preventScroll: true }); // the button hides: keep the focus in the pane
    };
  }

  add(data) {
    const { stream, lines } = logLines(data);
    const kept = lines.length > MAX_LINES ? lines.slice(-MAX_LINES) : lines;
    const fragment = document.createDocumentFragment();
    for (const line of kept) fragment.append(lineElement(stream, line));
    this.panel.hidden = false;
    this.pane.append(fragment);
    this.trim(lines.length - kept.length);
    if (this.following) this.scrollToLatest();
  }

  // Drop the oldest lines beyond MAX_LINES, and say how many are gone.
  trim(droppedUnseen) {
    const excess = this.pane.childElementCount - MAX_LINES;
    if (excess <= 0 && droppedUnseen === 0) return;
    if (excess > 0) {
      // A reader who scrolled up keeps their lines in view: the height removed above
      // them comes off the scroll position (the pane has no scroll anchoring; below).
      const heightBefore = this.following ? 0 : this.pane.scrollHeight;
      for (let k = 0; k < excess; k += 1) this.pane.firstElementChild.remove();
      if (!this.following) this.pane.scrollTop -= heightBefore - this.pane.scrollHeight;
    }
    this.dropped += Math.max(excess, 0) + droppedUnseen;
    const count = this.dropped === 1 ? "1 earlier line is" : `${this.dropped.toLocaleString("en")} earlier lines are`;
    this.droppedNote.textContent = `${count} not shown here: the pane keeps the last ${MAX_LINES.toLocaleString("en")}.`;
    this.droppedNote.hidden = false;
  }

  // Once per frame, however many events came in it: reading scrollHeight costs a layout.
  scrollToLatest() {
    if (this.scrollPending) return;
    this.scrollPending = true;
    requestAnimationFrame(() => {
      this.scrollPending = false;
      if (this.following) this.pane.scrollTop = this.pane.scrollHeight;
    });
  }

  // While following, the pane's own scrolling only goes down (to the latest line),
  // and it has `overflow-anchor: none` (viewer.css), so that dropping old lines
  // does not move it up either: a move up is the reader's.
  onScroll() {
    const top = this.pane.scrollTop;
    const atBottom = this.pane.scrollHeight - this.pane.clientHeight - top <= BOTTOM_SLACK;
    if (atBottom) this.setFollowing(true);
    else if (top < this.lastScrollTop) this.setFollowing(false);
    this.lastScrollTop = top;
  }

  setFollowing(following) {
    this.following = following;
    this.latest.hidden = following;
  }
}
