// Routing: #/ is the home page, #/jobs/<id> a job. The hash keeps a job page
// linkable and lets it survive a reload (the server never sees the fragment).

import { $, clearNotice } from "./dom.js";
import { loadTemplates } from "./form.js";
import { JobView } from "./job-view.js";
import { loadJobs } from "./jobs-list.js";

let currentJobView = null;

// The JobView of the job page on show, or null on the home page.
export function currentView() {
  return currentJobView;
}

function parseRoute() {
  const match = /^#\/jobs\/([^/?]+)(?:\?(.*))?$/.exec(location.hash);
  if (!match) return { page: "home" };
  const query = new URLSearchParams(match[2] || "");
  return { page: "job", jobId: decodeURIComponent(match[1]), token: query.get("token") || "" };
}

export function route() {
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
