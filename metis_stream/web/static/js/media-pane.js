// The job page's Media pane: a job's `chunk` events (docs/media.md), one box
// per stream, played or shown while they arrive.
//
// Audio: PCM (audio/pcm;rate=R;channels=C, signed 16-bit little-endian) and WAV
// (16-bit or float PCM) are decoded here, chunk by chunk, into AudioBuffers
// that play back to back through Web Audio, with a level meter. A chunk need
// not end on a sample: the bytes left over wait for the next one. Other audio
// types cannot be cut anywhere: they are decoded (decodeAudioData) and played
// once the job has ended. Images: each chunk is a whole image; the latest is
// shown large, with the earlier ones as a gallery. Anything else: a download.
//
// Each box counts what it took (data-chunks, data-next-index, data-gaps,
// data-decoded-seconds): a page that reconnects with after=N, or reloads,
// gets every chunk exactly once (job-view.js), and the counts say so.

import { $, el, formatSeconds } from "./dom.js";

const GALLERY_MAX = 60; // thumbnails kept per image stream
const START_LEAD = 0.05; // s: a buffer is never scheduled closer to "now" than this

function mediaParts(mediaType) {
  const [essence, ...rest] = String(mediaType).split(";");
  const params = {};
  for (const part of rest) {
    const [name, value] = part.split("=");
    if (value !== undefined) params[name.trim().toLowerCase()] = value.trim();
  }
  return { essence: essence.trim().toLowerCase(), params };
}

function decodeBase64(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

function concat(a, b) {
  if (a.length === 0) return b;
  const joined = new Uint8Array(a.length + b.length);
  joined.set(a);
  joined.set(b, a.length);
  return joined;
}

const WAV_TYPES = new Set(["audio/wav", "audio/wave", "audio/x-wav"]);

// The format of a WAV whose header is in `bytes`, and where its samples start;
// null while the header has not all come; {error} for a WAV this cannot play.
function parseWavHeader(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const text = (at) => String.fromCharCode(...bytes.subarray(at, at + 4));
  if (bytes.length < 12) return null;
  if (text(0) !== "RIFF" || text(8) !== "WAVE") return { error: "not a WAV file" };
  let offset = 12;
  let format = null;
  while (offset + 8 <= bytes.length) {
    const kind = text(offset);
    const size = view.getUint32(offset + 4, true);
    if (kind === "data") {
      if (!format) return { error: "a WAV without its fmt chunk" };
      return { ...format, dataStart: offset + 8 };
    }
    if (kind === "fmt ") {
      if (offset + 24 > bytes.length) return null;
      const tag = view.getUint16(offset + 8, true);
      const channels = view.getUint16(offset + 10, true);
      const rate = view.getUint32(offset + 12, true);
      const bits = view.getUint16(offset + 22, true);
      const float = tag === 3 || (tag === 0xfffe && bits === 32);
      if (!((bits === 16 && !float) || (bits === 32 && float)) || !channels || !rate) {
        return { error: `a WAV of ${bits}-bit samples (format ${tag}): save it to listen` };
      }
      format = { rate, channels, bits, float };
    }
    offset += 8 + size + (size % 2);
  }
  return null;
}

class StreamBox {
  constructor(name, mediaType, kind) {
    this.name = name;
    this.mediaType = mediaType;
    this.nextIndex = 0;
    this.chunks = 0;
    this.gaps = 0;
    this.node = el("section", { className: "media-stream", dataset: { stream: name, kind } },
      el("h3", {}, name, " ", el("span", { className: "media-type" }, mediaType)));
    this.count();
  }

  // Whether a chunk's index is the next one; a repeat is dropped, a gap counted.
  takes(index) {
    if (index < this.nextIndex) return false;
    this.gaps += index - this.nextIndex;
    this.nextIndex = index + 1;
    this.chunks += 1;
    this.count();
    return true;
  }

  count() {
    Object.assign(this.node.dataset, {
      chunks: String(this.chunks), nextIndex: String(this.nextIndex), gaps: String(this.gaps) });
  }

  finish() {}

  close() {}
}

class AudioBox extends StreamBox {
  constructor(name, mediaType) {
    super(name, mediaType, "audio");
    const { essence, params } = mediaParts(mediaType);
    this.essence = essence;
    this.format = null;
    if (essence === "audio/pcm") {
      this.format = { rate: Number(params.rate || 16000), channels: Number(params.channels || 1),
        bits: 16, float: false };
    }
    this.pending = new Uint8Array(0); // a WAV's header so far, or a sample cut in two
    this.whole = []; // the bytes of a type that only plays whole
    this.decodedSeconds = 0;
    this.nextTime = 0;
    this.context = new AudioContext();
    this.analyser = this.context.createAnalyser();
    this.analyser.fftSize = 1024;
    this.analyser.connect(this.context.destination);
    this.samples = new Float32Array(this.analyser.fftSize);
    this.button = el("button", { type: "button", className: "secondary play" });
    this.button.onclick = () => this.toggle();
    this.meter = el("meter", { className: "level", min: 0, max: 1, value: 0, title: "level" });
    this.status = el("span", { className: "muted media-status" }, "waiting for audio");
    this.node.append(el("div", { className: "media-controls" }, this.button,
      el("label", {}, "Level ", this.meter), this.status));
    this.context.onstatechange = () => this.showState();
    this.showState();
    this.node.dataset.decodedSeconds = "0";
  }

  showState() {
    const running = this.context.state === "running";
    this.button.textContent = running ? "Pause" : "Play";
    this.button.setAttribute("aria-pressed", String(running));
    this.node.dataset.state = this.context.state;
    if (running) this.watchLevel();
  }

  async toggle() {
    if (this.context.state === "running") await this.context.suspend();
    else await this.context.resume();
  }

  watchLevel() {
    if (this.levelTimer) return;
    const look = () => {
      if (this.context.state !== "running") {
        this.levelTimer = null;
        this.meter.value = 0;
        return;
      }
      this.analyser.getFloatTimeDomainData(this.samples);
      let sum = 0;
      for (const sample of this.samples) sum += sample * sample;
      this.meter.value = Math.min(1, 2 * Math.sqrt(sum / this.samples.length));
      this.levelTimer = requestAnimationFrame(look);
    };
    this.levelTimer = requestAnimationFrame(look);
  }

  add(bytes) {
    if (this.error) return;
    const playable = this.format || WAV_TYPES.has(this.essence);
    if (!playable) {
      this.whole.push(bytes);
      this.status.textContent = "plays when the job has ended";
      return;
    }
    let data = concat(this.pending, bytes);
    if (!this.format) {
      const header = parseWavHeader(data);
      if (header === null) {
        this.pending = data;
        return;
      }
      if (header.error) {
        this.fail(header.error);
        return;
      }
      this.format = header;
      data = data.subarray(header.dataStart);
    }
    const frame = this.format.channels * (this.format.bits / 8);
    const usable = data.length - (data.length % frame);
    this.pending = data.slice(usable);
    if (usable > 0) this.play(this.toBuffer(data.subarray(0, usable), frame));
  }

  toBuffer(data, frame) {
    const { rate, channels, float } = this.format;
    const frames = data.length / frame;
    const buffer = this.context.createBuffer(channels, frames, rate);
    const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    for (let c = 0; c < channels; c++) {
      const out = buffer.getChannelData(c);
      for (let i = 0; i < frames; i++) {
        const at = i * frame + c * (frame / channels);
        out[i] = float ? view.getFloat32(at, true) : view.getInt16(at, true) / 32768;
      }
    }
    return buffer;
  }

  // Back to back after what is queued; after a stall, from now.
  play(buffer) {
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.analyser);
    const start = Math.max(this.nextTime, this.context.currentTime + START_LEAD);
    source.start(start);
    this.nextTime = start + buffer.duration;
    this.decodedSeconds += buffer.duration;
    this.node.dataset.decodedSeconds = this.decodedSeconds.toFixed(3);
    this.status.textContent = `${formatSeconds(this.decodedSeconds)} received`;
  }

  async finish() {
    if (this.whole.length === 0 || this.error) return;
    const bytes = this.whole.reduce(concat, new Uint8Array(0));
    this.whole = [];
    try {
      this.play(await this.context.decodeAudioData(bytes.buffer));
    } catch {
      this.fail(`this browser cannot play ${this.essence}: save it to listen`);
    }
  }

  fail(message) {
    this.error = message;
    this.status.textContent = message;
    this.node.dataset.error = message;
  }

  close() {
    cancelAnimationFrame(this.levelTimer);
    this.context.close();
  }
}

class ImageBox extends StreamBox {
  constructor(name, mediaType) {
    super(name, mediaType, "image");
    this.latest = el("img", { className: "media-latest", alt: `${name}: latest image` });
    this.gallery = el("ol", { className: "media-gallery" });
    this.urls = [];
    this.node.append(this.latest, this.gallery);
  }

  add(bytes, index, mediaType) {
    const url = URL.createObjectURL(new Blob([bytes], { type: mediaParts(mediaType).essence }));
    this.urls.push(url);
    this.latest.src = url;
    const thumb = el("img", { src: url, alt: `${this.name} #${index}` });
    const button = el("button", { type: "button", className: "thumb", title: `#${index}` }, thumb);
    button.onclick = () => { this.latest.src = url; };
    this.gallery.append(el("li", {}, button));
    if (this.gallery.children.length > GALLERY_MAX) {
      this.gallery.firstElementChild.remove();
      URL.revokeObjectURL(this.urls.shift());
    }
  }

  close() {
    for (const url of this.urls) URL.revokeObjectURL(url);
  }
}

class FileBox extends StreamBox {
  constructor(name, mediaType) {
    super(name, mediaType, "file");
    this.parts = [];
    this.bytes = 0;
    this.link = el("a", { className: "media-download", download: name }, "Download");
    // The file so far, made when asked for (a new one per chunk would copy it each time).
    this.link.onclick = () => {
      if (this.link.href) URL.revokeObjectURL(this.link.href);
      this.link.href = URL.createObjectURL(new Blob(this.parts, { type: mediaParts(mediaType).essence }));
    };
    this.size = el("span", { className: "muted" });
    this.node.append(this.link, " ", this.size);
  }

  add(bytes) {
    this.parts.push(bytes);
    this.bytes += bytes.length;
    this.size.textContent = `${this.bytes} bytes`;
  }
}

export class MediaPane {
  constructor() {
    this.boxes = new Map();
    $("media").replaceChildren();
    $("media-panel").hidden = true;
  }

  add(data) {
    if (!data || typeof data !== "object" || typeof data.base64 !== "string") return;
    let box = this.boxes.get(data.stream);
    if (!box) {
      const { essence } = mediaParts(data.media_type);
      const Kind = essence.startsWith("audio/") ? AudioBox
        : essence.startsWith("image/") ? ImageBox : FileBox;
      box = new Kind(String(data.stream), String(data.media_type));
      this.boxes.set(data.stream, box);
      $("media").append(box.node);
      $("media-panel").hidden = false;
    }
    if (!box.takes(Number(data.index))) return;
    box.add(decodeBase64(data.base64), data.index, data.media_type);
  }

  finish() {
    for (const box of this.boxes.values()) box.finish();
  }

  close() {
    for (const box of this.boxes.values()) box.close();
  }
}
