// The jobs list on the home page: GET /api/jobs, newest first, a state badge each.

import { rememberWatchToken } from "./auth.js";
import { $, el, formatTime } from "./dom.js";
import { api } from "./http.js";

function badge(state) {
  return el("span", { className: "badge", dataset: { state } }, state);
}

export async function loadJobs() {
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

export function setupJobsList() {
  $("refresh-jobs").addEventListener("click", loadJobs);
}
