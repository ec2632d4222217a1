// The job page's Files panel (`FilesPanel`): the job's folder on the cluster as
// GET api/jobs/<id>/files lists it, each file a download link; images shown
// inline, text files shown on request (their first PREVIEW_BYTES, by Range).
// Links carry the job's watch token: a link cannot carry the API key's header.

import { apiKey } from "./auth.js";
import { $, el, formatTime } from "./dom.js";
import { api, apiUrl } from "./http.js";

const PREVIEW_BYTES = 65536;
const IMAGE = /\.(png|jpe?g|gif|webp)$/i;
const TEXT = /(\.(txt|log|csv|tsv|json|md|out|err|ya?ml|toml|xml|py|sh)|^(stdout|stderr|exit|launcher\.(out|err)))$/i;

export function formatSize(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

export class FilesPanel {
  constructor(jobId, token) {
    this.jobId = jobId;
    this.token = token; // () => the watch token, once the record has given it
    this.loading = null;
    $("files-panel").hidden = true;
    $("files").replaceChildren();
    $("file-preview").replaceChildren();
    $("file-preview").hidden = true;
    $("refresh-files").onclick = () => this.load();
  }

  fileUrl(path) {
    const encoded = path.split("/").map(encodeURIComponent).join("/");
    return apiUrl(`api/jobs/${encodeURIComponent(this.jobId)}/files/${encoded}`,
      { token: this.token() });
  }

  // One listing at a time: a second call while one runs waits for it.
  load() {
    this.loading ??= this.fetchListing().finally(() => { this.loading = null; });
    return this.loading;
  }

  async fetchListing() {
    let listing;
    try {
      listing = await api(`api/jobs/${encodeURIComponent(this.jobId)}/files`,
        { query: { token: this.token() } });
    } catch (error) {
      $("files-panel").hidden = false;
      $("files-table").hidden = true;
      $("files-status").textContent = error.status === 404
        ? "No files yet." : `Could not list the files: ${error.message}`;
      return;
    }
    $("files-panel").hidden = false;
    // The template's outputs first, then the rest, each group by path.
    const files = [...listing.files].sort((a, b) => (b.output - a.output) || a.path.localeCompare(b.path));
    $("files").replaceChildren(...files.map((file) => this.row(file)));
    $("files-table").hidden = files.length === 0;
    $("files-status").textContent = files.length === 0 ? "No files yet."
      : `${files.length} file${files.length === 1 ? "" : "s"}`
        + (listing.truncated ? " (more than a listing shows)" : "");
  }

  row(file) {
    const url = this.fileUrl(file.path);
    const name = file.path.split("/").pop();
    const link = el("a", { href: url.href, download: name, className: "file-link" }, file.path);
    let view = null;
    if (IMAGE.test(name)) {
      view = el("img", { src: url.href, alt: file.path, className: "file-thumb", loading: "lazy" });
    } else if (TEXT.test(name)) {
      view = el("button", { type: "button", className: "secondary", onclick: () => this.showText(file) }, "Show");
    }
    return el("tr", { dataset: { path: file.path } },
      el("td", {}, link, file.output ? el("span", { className: "badge output-badge" }, "output") : null),
      el("td", { className: "num" }, formatSize(file.size)),
      el("td", {}, formatTime(file.modified)),
      el("td", {}, view));
  }

  async showText(file) {
    const preview = $("file-preview");
    const headers = { Range: `bytes=0-${PREVIEW_BYTES - 1}` };
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    let text;
    try {
      const response = await fetch(this.fileUrl(file.path), { headers });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      text = new TextDecoder().decode(await response.arrayBuffer());
    } catch (error) {
      text = `Could not read ${file.path}: ${error.message}`;
    }
    const cut = file.size > PREVIEW_BYTES ? ` (the first ${formatSize(PREVIEW_BYTES)} of ${formatSize(file.size)})` : "";
    preview.replaceChildren(
      el("h3", {}, `${file.path}${cut}`),
      el("pre", { className: "file-text", tabIndex: 0 }, text));
    preview.hidden = false;
  }
}
