// What each event type does to the job page (a JobView). Unknown types only
// appear in the "All events" list, so a new type never breaks the viewer.

import { $ } from "./dom.js";

export const EVENT_HANDLERS = {
  submitted: (view, e) => { $("job-scheduler-id").textContent = String(e.data ?? "—"); },
  step: (view, e) => view.addStep(typeof e.data === "string" ? e.data : JSON.stringify(e.data), e.time),
  progress: (view, e) => view.setProgress(e.data),
  token: (view, e) => view.appendToken(typeof e.data === "string" ? e.data : String(e.data ?? "")),
  chunk: (view, e) => view.media.add(e.data),
  log: (view, e) => view.logs.add(e.data),
  result: (view, e) => view.showResult(e.data),
  completed: (view, e) => { if (e.data !== null && e.data !== undefined) view.showResult(e.data); },
  fatal: (view, e) => view.showError(e.data),
  cancelled: (view, e) => view.showError(e.data ?? "cancelled"),
  elements: (view, e) => view.setProgress(tallyProgress(e.data)),
  stale: (view, e) => view.showStale(e.data, e.time),
  recovered: (view) => view.hideStale(),
};

// An array's tally (docs/arrays.md) as the progress bar: the elements that have
// ended, of all of them.
function tallyProgress(tally) {
  if (!tally || typeof tally !== "object") return null;
  const count = (key) => (Number.isInteger(tally[key]) ? tally[key] : 0);
  const ended = count("done") + count("failed");
  return {
    current: ended,
    total: ended + count("queued") + count("running"),
    label: `elements ended (${count("running")} running, ${count("failed")} failed)`,
  };
}
