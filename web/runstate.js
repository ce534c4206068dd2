// Run state per node, fed by the server's websocket: status (running, cached, done, skipped), progress, the live
// preview, outputs (images, text) and errors, drawn onto each node's element. It outlives the elements: a node
// rebuilt mid-run (renamed, linked) shows its state again, and so do nodes brought back by undo.
//
// handle(type, data) takes the node-level websocket messages; preview(blob, meta) the binary preview frames.
// A frame that names its node (PREVIEW_IMAGE_WITH_METADATA) goes to that node if it belongs to the running
// prompt; a plain one (PREVIEW_IMAGE) goes to the node that last started, as ComfyUI's own frontend does.

import { h } from "./widgets.js";

/** The websocket messages the run state follows (see handle). */
export const RUN_MESSAGES = ["execution_start", "execution_cached", "executing", "progress", "executed", "node_skipped",
  "execution_error", "execution_success", "execution_interrupted"];

function revoke(url) {
  if (url && url.startsWith("blob:")) URL.revokeObjectURL(url);
}

export class RunState {
  /**
   * views: the node views by id (read when drawing); viewUrl(image) -> URL of an output image; showImage(url,
   * image) enlarges one; relayout() is called when a node's size may have changed.
   */
  constructor({ graph, views, viewUrl, showImage, relayout }) {
    Object.assign(this, { graph, views, viewUrl, showImage, relayout });
    this.nodes = new Map();
    this.current = null; // the run in progress: {promptId, started, node}
  }

  _st(id) {
    let s = this.nodes.get(id);
    if (!s) {
      s = { status: "", progress: null, errors: [], output: null, preview: null, skippedBecause: null };
      this.nodes.set(id, s);
    }
    return s;
  }

  // --- per node -------------------------------------------------------------------------------------------------
  setStatus(id, status) {
    if (!this.graph.node(id)) return;
    const s = this._st(id);
    s.status = status;
    if (status !== "skipped") s.skippedBecause = null;
    if (status !== "running") {
      s.progress = null;
      // previews are live: they go when the node is done
      revoke(s.preview);
      s.preview = null;
    }
    this.apply(id);
  }

  /** A node that did not run because the node `because` (upstream) failed or was skipped. */
  setSkipped(id, because) {
    if (!this.graph.node(id)) return;
    this.setStatus(id, "skipped");
    this._st(id).skippedBecause = because === null || because === undefined ? "" : String(because);
    this.apply(id);
  }

  setProgress(id, value, max) {
    if (!this.graph.node(id)) return;
    this._st(id).progress = { value, max };
    this.apply(id);
  }

  setOutput(id, output) {
    if (!this.graph.node(id)) return;
    const s = this._st(id);
    s.output = output;
    revoke(s.preview);
    s.preview = null;
    this.apply(id);
  }

  setPreview(id, url) {
    if (!this.graph.node(id)) return;
    const s = this._st(id);
    revoke(s.preview);
    s.preview = url;
    this.apply(id);
  }

  setErrors(id, errors) {
    if (!this.graph.node(id)) return;
    this._st(id).errors = errors;
    this.apply(id);
  }

  clearErrors() {
    for (const id of this.nodes.keys()) this.setErrors(id, []);
  }

  clearInputError(id, input) {
    const s = this.nodes.get(id);
    if (!s || !s.errors.length) return;
    const left = s.errors.filter((e) => e.input !== input);
    if (left.length !== s.errors.length) {
      s.errors = left;
      this.apply(id);
    }
  }

  /** Forget statuses and errors before a run (outputs stay until new ones come). */
  resetRun({ keepOutputs = true } = {}) {
    for (const [id, s] of this.nodes) {
      s.status = "";
      s.progress = null;
      s.errors = [];
      s.skippedBecause = null;
      if (!keepOutputs) s.output = null;
      revoke(s.preview);
      s.preview = null;
      this.apply(id);
    }
  }

  forget(id) {
    revoke(this.nodes.get(id)?.preview);
    this.nodes.delete(id);
  }

  /** Forget the state of nodes no longer in the graph (all of it when a new workflow is loaded). */
  prune({ all = false } = {}) {
    for (const id of [...this.nodes.keys()]) if (all || !this.graph.node(id)) this.forget(id);
  }

  // --- the websocket --------------------------------------------------------------------------------------------
  handle(type, data) {
    const id = (value) => (value === undefined || value === null ? null : String(value));
    const current = this.current;
    if (type === "execution_start") {
      this.current = { promptId: data.prompt_id, started: performance.now(), node: null };
      this.resetRun();
    } else if (type === "execution_cached") {
      for (const node of data.nodes || []) this.setStatus(String(node), "cached");
    } else if (type === "executing") {
      if (current?.node) this.setStatus(current.node, "done");
      const node = id(data.node);
      if (node === null) {
        if (current) current.node = null;
        return;
      }
      // joined mid-run (a reload): the run is the one this node belongs to
      if (!current) this.current = { promptId: data.prompt_id, started: performance.now(), node: null };
      this.current.node = node;
      this.setStatus(node, "running");
    } else if (type === "progress") {
      if (id(data.node) !== null) this.setProgress(id(data.node), data.value, data.max);
    } else if (type === "executed") {
      this.setOutput(id(data.node), data.output || {});
    } else if (type === "node_skipped") {
      if (id(data.node) !== null) this.setSkipped(id(data.node), id(data.because_of));
    } else if (type === "execution_error") {
      const node = id(data.node_id);
      if (node !== null && this.graph.node(node)) {
        this.setStatus(node, "");
        this.setErrors(node, [{ type: data.exception_type, message: data.exception_message || "failed", input: null }]);
      }
      if (current) current.node = null;
    } else if (type === "execution_success") {
      this.current = null;
    } else if (type === "execution_interrupted") {
      if (current?.node) this.setStatus(current.node, "");
      this.current = null;
    }
  }

  /** Show a preview frame; returns the id of the node that shows it, or null when it was dropped. */
  preview(blob, meta = null) {
    let id;
    if (meta) {
      // a frame of another prompt (queued by this client in another tab, or one already over) is not ours
      if (!this.current) return null;
      if (meta.prompt_id && this.current.promptId && meta.prompt_id !== this.current.promptId) return null;
      const named = meta.display_node_id ?? meta.node_id;
      id = named === undefined || named === null ? null : String(named);
    } else {
      id = this.current?.node ?? null;
    }
    if (id === null || !this.graph.node(id)) return null;
    this.setPreview(id, URL.createObjectURL(blob));
    return id;
  }

  // --- drawing --------------------------------------------------------------------------------------------------
  apply(id) {
    const view = this.views.get(id);
    if (!view) return;
    const s = this.nodes.get(id);
    const status = s?.status || "";
    const failed = !!(s && s.errors.length);
    const el = view.el;
    for (const name of ["running", "cached", "done", "skipped"]) el.classList.toggle(name, status === name);
    el.classList.toggle("has-error", failed);
    const skipped = status !== "skipped" ? "" : s.skippedBecause
      ? `skipped: input from node ${s.skippedBecause} failed` : "skipped: an input failed";
    view.badge.textContent = status === "cached" ? "cached" : failed ? "error" : status === "skipped" ? "skipped" : "";
    view.badge.className = `ng-badge ${failed ? "error" : status}`;
    view.badge.title = skipped;
    if (skipped) el.title = skipped;
    else el.removeAttribute("title");
    const bar = view.progress.firstChild;
    if (s && s.progress && s.progress.max > 0) {
      view.progress.classList.add("visible");
      bar.style.width = `${Math.min(100, (100 * s.progress.value) / s.progress.max)}%`;
    } else {
      view.progress.classList.remove("visible");
      bar.style.width = "0";
    }
    this._drawErrors(view, s?.errors || []);
    this._drawOutput(view, s);
  }

  /** Every error on the node, and each one also on the input it is about. */
  _drawErrors(view, errors) {
    view.errors.replaceChildren();
    for (const row of view.rows.values()) {
      row.classList.remove("has-error");
      const slot = row.querySelector(".ng-input-error");
      if (slot) slot.textContent = "";
    }
    for (const err of errors) {
      const where = err.input ? `${err.input}: ` : "";
      view.errors.append(h("div", { class: "ng-error", "data-input": err.input || "", text: where + err.message }));
      const row = err.input ? view.rows.get(err.input) : null;
      if (!row) continue;
      row.classList.add("has-error");
      let slot = row.querySelector(".ng-input-error");
      if (!slot) {
        slot = h("div", { class: "ng-input-error" });
        row.append(slot);
      }
      slot.textContent = slot.textContent ? `${slot.textContent}\n${err.message}` : err.message;
    }
  }

  /** Images, else the live preview; then any text. */
  _drawOutput(view, s) {
    view.output.replaceChildren();
    const images = s?.output?.images || [];
    if (images.length) {
      const grid = h("div", { class: `ng-images n${Math.min(images.length, 4)}` });
      for (const image of images) {
        const url = this.viewUrl(image);
        const img = h("img", { class: "ng-image", src: url, alt: image.filename, draggable: "false",
          title: image.filename });
        img.addEventListener("load", () => this.relayout());
        img.addEventListener("click", () => this.showImage(url, image));
        grid.append(img);
      }
      view.output.append(grid);
    } else if (s?.preview) {
      const img = h("img", { class: "ng-image ng-preview", src: s.preview, alt: "preview", draggable: "false" });
      img.addEventListener("load", () => this.relayout());
      view.output.append(img);
    }
    for (const text of s?.output?.text || []) {
      view.output.append(h("pre", { class: "ng-text-output", text: String(text) }));
    }
  }
}
