// The API key and the watch tokens.
//
// The API key is kept in this browser's localStorage and sent as a Bearer
// header by http.js. Watch tokens let a websocket (which cannot send an
// Authorization header) watch one job; they come with the job record, and
// sessionStorage keeps them across a reload of the job page.

import { $, announce, clearNotice } from "./dom.js";

const KEY_STORAGE = "metis-stream.api-key";
const TOKEN_STORAGE = "metis-stream.watch-tokens";

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
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
