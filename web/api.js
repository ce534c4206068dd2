// HTTP and websocket client for the nodegraph server.
//
// Every request carries the bearer token when the page was opened with "#token=..." (the server prints such a
// link when it is bound to a non-loopback address). Websocket messages are re-dispatched as DOM events named
// after their "type" (status, executing, progress, executed, node_skipped, ...), with the message's "data" as
// the detail; binary preview frames become a "preview" event whose detail is {blob, meta}.
//
// Binary frames follow ComfyUI: a big-endian uint32 event type, then for PREVIEW_IMAGE (1) a uint32 format (1 JPEG,
// 2 PNG) and the image; for PREVIEW_IMAGE_WITH_METADATA (4) a uint32 length N, N bytes of JSON metadata
// ({node_id, display_node_id, prompt_id, image_type}) and the image. A server sends type 4 only to clients that
// ask for it in a "feature_flags" message right after the socket opens; meta is null for type 1.

const TOKEN_KEY = "nodegraph.token";
const PREVIEW_IMAGE = 1;
const PREVIEW_IMAGE_WITH_METADATA = 4;
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"];

/** What this client understands beyond the base protocol; sent to the server when the socket opens. */
export const FEATURE_FLAGS = { supports_preview_metadata: true };
const CLIENT_KEY = "nodegraph.clientId";

export class ApiError extends Error {
  constructor(message, status, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function randomId() {
  if (crypto.randomUUID) return crypto.randomUUID().replace(/-/g, "");
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function readToken() {
  const match = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (match) {
    const token = decodeURIComponent(match[1]);
    sessionStorage.setItem(TOKEN_KEY, token);
    // keep the token out of the address bar (and out of screenshots and bookmarks)
    history.replaceState(null, "", location.pathname + location.search);
    return token;
  }
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export class Api extends EventTarget {
  constructor(base = "") {
    super();
    this.base = base;
    this.token = readToken();
    let id = sessionStorage.getItem(CLIENT_KEY);
    if (!id) {
      id = randomId();
      sessionStorage.setItem(CLIENT_KEY, id);
    }
    this.clientId = id;
    this.socket = null;
    this.connected = false;
    this._retry = 500;
    this._closing = false;
  }

  headers(extra = {}) {
    return this.token ? { ...extra, Authorization: `Bearer ${this.token}` } : extra;
  }

  async request(path, { method = "GET", json, body, headers } = {}) {
    const init = { method, headers: this.headers(headers) };
    if (json !== undefined) {
      init.body = JSON.stringify(json);
      init.headers["Content-Type"] = "application/json";
    } else if (body !== undefined) {
      init.body = body;
    }
    let response;
    try {
      response = await fetch(this.base + path, init);
    } catch (err) {
      throw new ApiError(`cannot reach the server (${err.message})`, 0, null);
    }
    const text = await response.text();
    let data = text;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      /* not JSON: keep the text */
    }
    if (!response.ok) {
      const message = typeof data === "object" && data && data.error
        ? (typeof data.error === "string" ? data.error : data.error.message || "request failed")
        : `${response.status} ${response.statusText}`;
      throw new ApiError(message, response.status, data);
    }
    return data;
  }

  /** A ComfyUI workflow (editor or API format) converted to ours by the server. */
  importDocument(doc) {
    return this.request("/nodegraph/import", { method: "POST", json: doc });
  }

  objectInfo() {
    return this.request("/object_info");
  }

  workflows() {
    return this.request("/workflows");
  }

  workflow(name) {
    return this.request(`/workflows/${encodeURIComponent(name)}`);
  }

  /** Queue a workflow. Resolves to the server's answer; a 400 rejects with an ApiError carrying node_errors. */
  queuePrompt(workflow) {
    return this.request("/prompt", { method: "POST", json: { prompt: workflow, client_id: this.clientId } });
  }

  interrupt() {
    return this.request("/interrupt", { method: "POST", json: {} });
  }

  queue() {
    return this.request("/queue");
  }

  async uploadImage(file, { overwrite = false } = {}) {
    const form = new FormData();
    form.append("image", file, file.name || "upload.png");
    form.append("type", "input");
    if (overwrite) form.append("overwrite", "true");
    return this.request("/upload/image", { method: "POST", body: form });
  }

  viewUrl({ filename, subfolder = "", type = "output" }) {
    const params = new URLSearchParams({ filename, subfolder, type });
    if (this.token) params.set("token", this.token);
    return `${this.base}/view?${params}`;
  }

  // --- websocket ------------------------------------------------------------------------------------------------
  connect() {
    this._closing = false;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const params = new URLSearchParams({ clientId: this.clientId });
    if (this.token) params.set("token", this.token);
    const base = this.base || `${scheme}//${location.host}`;
    const url = `${base.replace(/^http/, "ws")}/ws?${params}`;
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.addEventListener("open", () => {
      socket.send(JSON.stringify({ type: "feature_flags", data: FEATURE_FLAGS }));
      this.connected = true;
      this._retry = 500;
      this.dispatchEvent(new CustomEvent("connection", { detail: { connected: true } }));
    });
    socket.addEventListener("close", () => {
      if (this.socket !== socket) return;
      const was = this.connected;
      this.connected = false;
      if (was) this.dispatchEvent(new CustomEvent("connection", { detail: { connected: false } }));
      if (!this._closing) {
        setTimeout(() => this.connect(), this._retry);
        this._retry = Math.min(this._retry * 2, 10000);
      }
    });
    socket.addEventListener("message", (event) => this.receive(event.data));
  }

  close() {
    this._closing = true;
    if (this.socket) this.socket.close();
  }

  /** Dispatch one websocket message (text or ArrayBuffer). The socket feeds it; tests may feed it too. */
  receive(data) {
    if (data instanceof ArrayBuffer) {
      const preview = parsePreview(data);
      if (preview) this.dispatchEvent(new CustomEvent("preview", { detail: preview }));
      return;
    }
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (!message || typeof message.type !== "string") return;
    this.dispatchEvent(new CustomEvent(message.type, { detail: message.data || {} }));
  }
}

/** A binary preview frame as {blob, meta}; null for other frames and for malformed ones. */
export function parsePreview(buffer) {
  if (buffer.byteLength < 8) return null;
  const view = new DataView(buffer);
  const kind = view.getUint32(0);
  if (kind === PREVIEW_IMAGE) {
    const mime = view.getUint32(4) === 2 ? "image/png" : "image/jpeg";
    return { blob: new Blob([buffer.slice(8)], { type: mime }), meta: null };
  }
  if (kind !== PREVIEW_IMAGE_WITH_METADATA) return null;
  const length = view.getUint32(4);
  if (8 + length > buffer.byteLength) return null;
  let meta;
  try {
    meta = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, length)));
  } catch {
    return null;
  }
  if (!meta || typeof meta !== "object") return null;
  // the type comes from the server's JSON: only an image type may label the blob the page will display
  const mime = IMAGE_TYPES.includes(meta.image_type) ? meta.image_type : "image/png";
  return { blob: new Blob([buffer.slice(8 + length)], { type: mime }), meta };
}
