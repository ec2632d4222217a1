// metis-stream viewer: plain ES modules, no build step, no external resources.
// This is the entry point (index.html loads it with <script type="module">);
// each module holds one concept:
//
//   dom.js             text-only DOM helpers, the notice and the live region
//   auth.js            the API key (the key box, or #key= once) and the watch tokens
//   http.js            api(): fetch + JSON + the Bearer key, relative URLs
//   router.js          #/ and #/jobs/<id>: which page is shown
//   form.js            the templates and the submit form
//   jobs-list.js       the jobs list on the home page
//   job-view.js        the job page: its websocket, seq bookkeeping, rendering
//   log-pane.js        the job page's Logs: streams told apart, following, a bounded DOM
//   ansi.js            a line's ANSI colours -> styled segments (pure)
//   event-handlers.js  what each event type does to the job page
//   meta.js            the job state machine, loaded from GET /api/meta
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

import { setupKeyForm, takeKeyFromAddress } from "./auth.js";
import { $, showNotice } from "./dom.js";
import { setupSubmitForm } from "./form.js";
import { setupJobsList } from "./jobs-list.js";
import { loadMeta, metaLoaded } from "./meta.js";
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

// Show the page the URL names. The first time, load the job state machine
// from the server: no page is shown without it. A failed load says so and is
// tried again on the next navigation or saved key (or a reload).
async function show() {
  if (!metaLoaded()) {
    try {
      await loadMeta();
    } catch (error) {
      // A 401 has raised the "needs an API key" notice already: keep that one.
      if (error.status !== 401) {
        showNotice(`Could not load the job states from the server (api/meta): ${error.message}. `
          + "The viewer cannot work without them; reload the page to try again.");
      }
      return;
    }
  }
  route();
}

function init() {
  takeKeyFromAddress(); // first: the key box and the first requests use it
  setupKeyForm(show); // a saved key retries whatever the page was showing
  setupSubmitForm();
  setupJobsList();
  window.addEventListener("hashchange", () => {
    show();
    $("main").focus({ preventScroll: true }); // move keyboard focus to the new page
  });
  show();
}

init();
