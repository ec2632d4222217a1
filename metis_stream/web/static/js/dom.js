// Small DOM helpers. They only ever make Text nodes and set element properties:
// nothing here parses HTML, so job data can never become markup.

export const $ = (id) => document.getElementById(id);

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name in node) node[name] = value;
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function announce(message) {
  // Replacing the text of the live region makes screen readers read it once.
  $("announcer").textContent = message;
}

export function showNotice(message, { auth = false } = {}) {
  const notice = $("notice");
  notice.textContent = message;
  notice.hidden = false;
  if (auth) {
    // A 401 is fixed in the key box: open it and put the cursor there.
    $("key-box").open = true;
    $("api-key").focus();
  }
}

export function clearNotice() {
  $("notice").hidden = true;
  $("notice").textContent = "";
}

export function formatSeconds(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) seconds = 0;
  if (seconds < 10) return `${seconds.toFixed(2)} s`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${Math.round(seconds - minutes * 60)} s`;
}

export function formatTime(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleString();
}

// Text -> nodes, with http(s) URLs as links. The link's href is set as a
// property only after URL() parsed it and its protocol is http or https, so a
// job cannot smuggle `javascript:` or markup into the page.
export function linkify(text) {
  const nodes = [];
  const pattern = /https?:\/\/[^\s"'<>\\]+/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    let href;
    try {
      href = new URL(match[0]);
    } catch {
      continue;
    }
    if (href.protocol !== "http:" && href.protocol !== "https:") continue;
    nodes.push(document.createTextNode(text.slice(last, match.index)));
    nodes.push(el("a", { href: href.href, rel: "noopener noreferrer nofollow" }, match[0]));
    last = match.index + match[0].length;
  }
  nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}
