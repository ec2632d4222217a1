// metis-stream viewer: plain ES modules, no build step, no external resources.
// This is the entry point (index.html loads it with <script type="module">);
// each module holds one concept:
//
//   dom.js             text-only DOM helpers, the notice and the live region
//   auth.js            the API key and the per-job watch tokens
//   http.js            api(): fetch + JSON + the Bearer key, relative URLs
//   router.js          #/ and #/jobs/<id>: which page is shown
//   form.js            the templates and the submit form
//   jobs-list.js       the jobs list on the home page
//   job-view.js        the job page: its websocket, seq bookkeeping, rendering
//   event-handlers.js  what each event type does to the job page
//
// Rules these modules keep (see docs/viewer.md):
// - Job data never goes through innerHTML: every value becomes a Text node or
//   an element property (textContent, href after a protocol check).
// - Every URL is relative to the page (document.baseURI), so the viewer also
//   works when a proxy serves the server under a sub-path. Imports are
//   relative too.
// - A job's events are applied exactly once: each one carries a gapless `seq`,
//   the page remembers the last one it applied, and a reconnect asks the
//   server for `after=<that seq>`; anything at or below it is ignored.

import { setupKeyForm } from "./auth.js";
import { $ } from "./dom.js";
import { setupSubmitForm } from "./form.js";
import { setupJobsList } from "./jobs-list.js";
import { currentView, route } from "./router.js";

// The hook the browser tests use to drop a socket mid-stream; harmless in use.
window.__metisViewer = {
  dropConnection: () => currentView()?.dropConnection(),
  state: () => {
    const view = currentView();
    return view && {
      jobId: view.jobId, lastSeq: view.lastSeq, state: view.state, connection: view.connection,
    };
  },
};

function init() {
  setupKeyForm(route); // a saved key retries whatever the page was showing
  setupSubmitForm();
  setupJobsList();
  window.addEventListener("hashchange", () => {
    route();
    $("main").focus({ preventScroll: true }); // move keyboard focus to the new page
  });
  route();
}

init();
