// One line of a program's output, with its ANSI escapes, as styled segments.
// Pure: no DOM, no state between lines; the log pane turns the segments into
// elements (log-pane.js).
//
// Rendered: SGR ("ESC [ ... m") reset, bold, and the 16 standard colours,
// foreground and background (also as 256-colour codes 0-15, which name the
// same colours). Every other sequence (cursor moves, clearing the screen, OSC
// window titles and hyperlinks, ...) is dropped whole: a log pane is not a
// screen, and nothing a job prints may act on the page. Any other control
// character, and an escape cut off before its end, becomes a visible
// placeholder (^@, ^[, U+009B): never interpreted, never silently gone.

const ESC = "\x1b";

// C0 except tab, DEL, C1, and the bidi embeddings, overrides and isolates:
// the last make a line read in another order than the one it holds.
const CONTROL = /[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]/;

const STRING_INTRODUCERS = "]PX^_"; // OSC, DCS, SOS, PM, APC: text up to a terminator

const PLAIN = Object.freeze({ fg: null, bg: null, bold: false });

// -> [{text, classes}]; a placeholder also has `control` ("U+0000"). Adjacent
// text of one style is one segment.
export function parseAnsi(line) {
  const segments = [];
  let style = PLAIN;
  let text = "";
  const flush = () => {
    if (text) segments.push({ text, classes: classesOf(style) });
    text = "";
  };
  let i = 0;
  while (i < line.length) {
    const char = line[i];
    if (char === ESC) {
      const escape = readEscape(line, i);
      if (escape) {
        if (escape.sgr !== null) {
          const next = applySgr(style, escape.sgr);
          if (classesOf(next).join(" ") !== classesOf(style).join(" ")) flush();
          style = next;
        }
        i = escape.end;
        continue;
      }
    }
    if (CONTROL.test(char)) {
      flush();
      segments.push(placeholder(char));
    } else {
      text += char;
    }
    i += 1;
  }
  flush();
  return segments;
}

function classesOf(style) {
  const classes = [];
  if (style.bold) classes.push("ansi-bold");
  if (style.fg !== null) classes.push(`ansi-fg-${style.fg}`);
  if (style.bg !== null) classes.push(`ansi-bg-${style.bg}`);
  return classes;
}

function placeholder(char) {
  const code = char.codePointAt(0);
  const name = `U+${code.toString(16).toUpperCase().padStart(4, "0")}`;
  // C0 and DEL in caret notation, as `cat -v` and terminals show them (plain ASCII: every
  // font has it, unlike U+2400 Control Pictures); the others by their code point.
  const shown = code < 0x20 ? `^${String.fromCharCode(code + 0x40)}` : code === 0x7f ? "^?" : name;
  return { text: shown, classes: ["ansi-ctrl"], control: name };
}

// The escape that starts at line[start] (an ESC): {end, sgr} with sgr the SGR's
// parameters, or null for any other sequence; null when it is cut off or malformed.
function readEscape(line, start) {
  const kind = line[start + 1];
  if (kind === undefined) return null;
  if (kind === "[") {
    // CSI: parameter bytes 0x30-0x3F, intermediate bytes 0x20-0x2F, a final byte 0x40-0x7E.
    let j = start + 2;
    while (j < line.length && inRange(line, j, 0x30, 0x3f)) j += 1;
    const params = line.slice(start + 2, j);
    const intermediates = j;
    while (j < line.length && inRange(line, j, 0x20, 0x2f)) j += 1;
    if (j >= line.length || !inRange(line, j, 0x40, 0x7e)) return null;
    const isSgr = line[j] === "m" && j === intermediates && /^[0-9;:]*$/.test(params);
    return { end: j + 1, sgr: isSgr ? params : null };
  }
  if (STRING_INTRODUCERS.includes(kind)) {
    // Ends at ST (ESC \, or U+009C); an OSC also at BEL, as xterm allows.
    for (let j = start + 2; j < line.length; j += 1) {
      if (line[j] === ESC && line[j + 1] === "\\") return { end: j + 2, sgr: null };
      if (line[j] === "\x9c" || (kind === "]" && line[j] === "\x07")) return { end: j + 1, sgr: null };
    }
    return null;
  }
  // Any other escape: intermediate bytes 0x20-0x2F, then one final byte 0x30-0x7E (ESC c, ESC ( B).
  let j = start + 1;
  while (j < line.length && inRange(line, j, 0x20, 0x2f)) j += 1;
  if (j >= line.length || !inRange(line, j, 0x30, 0x7e)) return null;
  return { end: j + 1, sgr: null };
}

function inRange(line, index, low, high) {
  const code = line.charCodeAt(index);
  return code >= low && code <= high;
}

function applySgr(style, params) {
  // An empty parameter means 0; one with sub-parameters (38:5:1, 4:3) is skipped whole.
  const codes = params.split(";").map((p) => (p === "" ? 0 : p.includes(":") ? NaN : Number(p)));
  let { fg, bg, bold } = style;
  for (let k = 0; k < codes.length; k += 1) {
    const code = codes[k];
    if (code === 0) ({ fg, bg, bold } = PLAIN);
    else if (code === 1) bold = true;
    else if (code === 22) bold = false;
    else if (code >= 30 && code <= 37) fg = code - 30;
    else if (code === 39) fg = null;
    else if (code >= 40 && code <= 47) bg = code - 40;
    else if (code === 49) bg = null;
    else if (code >= 90 && code <= 97) fg = code - 90 + 8;
    else if (code >= 100 && code <= 107) bg = code - 100 + 8;
    else if (code === 38 || code === 48) {
      // 38;5;N and 38;2;R;G;B: the numbers after 38 are its arguments, not codes (a 1
      // there is no bold). A colour beyond the 16 shows as the default one.
      let colour = null;
      if (codes[k + 1] === 5) {
        if (codes[k + 2] < 16) colour = codes[k + 2];
        k += 2;
      } else if (codes[k + 1] === 2) {
        k += 4;
      } else {
        break; // no colour model: the rest cannot be told from its arguments
      }
      if (code === 38) fg = colour;
      else bg = colour;
    }
    // Anything else (italic, underline, blink, inverse, ...) is not rendered.
  }
  return { fg, bg, bold };
}
