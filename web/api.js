// HTTP and websocket client for the nodegraph server.
//
// Every request carries the bearer token when the page was opened with "#token=..." (the server prints such a
// link when it is bound to a non-loopback address). Websocket messages are re-dispatched as DOM events named
// after their "type" (status, executing, progress, executed, ...), with the message's "data" as the detail;
// binary preview frames become a "preview" event whose detail is {blob}.

const TOKEN_KEY = "nodegraph.token";
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
    socket.addEventListener("message", (event) => this._onMessage(event));
  }

  close() {
    this._closing = true;
    if (this.socket) this.socket.close();
  }

  _onMessage(event) {
    if (event.data instanceof ArrayBuffer) {
      const view = new DataView(event.data);
      if (event.data.byteLength < 8) return;
      const kind = view.getUint32(0);
      const format = view.getUint32(4);
      if (kind === 1) {
        const mime = format === 2 ? "image/png" : "image/jpeg";
        const blob = new Blob([event.data.slice(8)], { type: mime });
        this.dispatchEvent(new CustomEvent("preview", { detail: { blob } }));
      }
      return;
    }
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    if (!message || typeof message.type !== "string") return;
    this.dispatchEvent(new CustomEvent(message.type, { detail: message.data || {} }));
  }
}
