// HTTP: every request goes through api(). URLs are relative to the page
// (document.baseURI, not this module's URL), so the viewer also works when a
// proxy serves the server under a sub-path.

import { apiKey } from "./auth.js";
import { showNotice } from "./dom.js";

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

export function apiUrl(path, query = {}) {
  const url = new URL(path, document.baseURI);
  for (const [name, value] of Object.entries(query)) {
    if (value !== "" && value !== undefined && value !== null) url.searchParams.set(name, value);
  }
  return url;
}

// fetch + JSON + Bearer key. A 401 also raises the "needs an API key" notice,
// so every caller gets the same clear message.
export async function api(path, { method = "GET", body, query } = {}) {
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
