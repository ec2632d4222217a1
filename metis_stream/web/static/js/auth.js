// The API key and the watch tokens.
//
// The API key is kept in this browser's localStorage and sent as a Bearer
// header by http.js; it comes from the key box, or once from the address (`#key=`). Watch tokens let a websocket (which cannot send an
// Authorization header) watch one job; they come with the job record, and
// sessionStorage keeps them across a reload of the job page.

import { $, announce, clearNotice } from "./dom.js";

const KEY_STORAGE = "metis-stream.api-key";
const TOKEN_STORAGE = "metis-stream.watch-tokens";

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

// The demo opens the viewer at `#key=<API key>`, as notebook servers do. The key is
// stored like one typed into the key box, then taken out of the address bar and out of
// the history entry, so that it is not bookmarked, shared with a link or shown on screen.
// A fragment is never sent in a request, so it reaches no server or proxy log.
export function takeKeyFromAddress() {
  const match = /^#key=([^&]+)$/.exec(location.hash);
  if (!match) return;
  try {
    localStorage.setItem(KEY_STORAGE, decodeURIComponent(match[1]));
  } catch {
    // A malformed escape (`%zz`) is no key; the key box still takes one.
  }
  history.replaceState(history.state, "", `${location.pathname}${location.search}#/`);
}

export function rememberWatchToken(job) {
  if (!job || !job.id || !job.watch_token) return;
  const tokens = JSON.parse(sessionStorage.getItem(TOKEN_STORAGE) || "{}");
  tokens[job.id] = job.watch_token;
  sessionStorage.setItem(TOKEN_STORAGE, JSON.stringify(tokens));
}

export function watchToken(jobId) {
  const tokens = JSON.parse(sessionStorage.getItem(TOKEN_STORAGE) || "{}");
  return tokens[jobId] || "";
}

// The "API key" box in the header. `onSaved` runs after a key is saved: it
// retries whatever the page was showing, now with the key.
export function setupKeyForm(onSaved) {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("key-box").open = false;
    clearNotice();
    announce("API key saved.");
    onSaved();
  });
  $("key-clear").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    announce("API key forgotten.");
  });
}
