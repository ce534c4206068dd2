// The application: wires the graph model, the canvas, the palette and the server together; runs workflows and
// shows their progress; saves, opens, autosaves; keyboard shortcuts. Tests reach it as window.nodegraph.app.

import { Api } from "./api.js";
import { Canvas, isTextEntry } from "./canvas.js";
import { Graph, History, NodeDefs, inputAccepts, isLink } from "./graph.js";
import { Palette, QuickAdd } from "./palette.js";
import { isPng, workflowFromPng } from "./png.js";
import { h, randomSeed } from "./widgets.js";

const AUTOSAVE_KEY = "nodegraph.autosave";
const CLIPBOARD_KEY = "nodegraph.clipboard";
const DEFAULT_WORKFLOW = "text-to-image";
const GALLERY_LIMIT = 200;

const $ = (selector) => document.querySelector(selector);

export const SHORTCUTS = [
  ["Ctrl+Enter", "run the workflow"],
  ["Delete / Backspace", "delete the selected nodes (or the selected link)"],
  ["Ctrl+C / Ctrl+V", "copy / paste the selected nodes (Ctrl+Shift+V keeps links from outside)"],
  ["Ctrl+X / Ctrl+D", "cut / duplicate"],
  ["Ctrl+Z / Ctrl+Shift+Z, Ctrl+Y", "undo / redo"],
  ["Ctrl+A", "select all"],
  ["Ctrl+S / Ctrl+O", "save / open a workflow"],
  [".", "fit the view (to the selection when several nodes are selected)"],
  ["drag background / middle button", "pan"],
  ["wheel", "zoom"],
  ["shift-click, shift/ctrl-drag", "add to the selection, box select"],
  ["drag from a socket", "connect (drop on empty space to add a matching node)"],
  ["double-click background", "search and add a node"],
  ["double-click a title", "rename the node"],
  ["right-click", "node and canvas menus"],
];

export class App {
  constructor() {
    this.api = new Api();
    this.graph = new Graph(new NodeDefs());
    this.history = new History();
    this.canvas = new Canvas(this, $("#canvas"));
    this.palette = new Palette(this, $("#palette"));
    this.quick = new QuickAdd(this);
    this.name = "";
    this.examples = [];
    this.gallery = [];
    this.current = null; // the run in progress: {promptId, started, node}
    this.counters = { previews: 0, executed: 0, runs: 0 };
    this.events = []; // the last websocket messages, for tests and debugging
    this._saveTimer = null;
    this.ready = this.init();
  }

  // --- start-up -------------------------------------------------------------------------------------------------
  async init() {
    this._bindUi();
    this._bindSocket();
    await this.refreshDefs({ quiet: true });
    try {
      this.examples = await this.api.workflows();
    } catch {
      this.examples = [];
    }
    this._fillExamples();
    this.api.connect();
    if (!this._restore()) {
      if (this.examples.includes(DEFAULT_WORKFLOW)) await this.loadExample(DEFAULT_WORKFLOW, { initial: true });
      else this.loadDocument({ format: "nodegraph/workflow", version: 1, nodes: {} }, { name: "", initial: true });
    }
    document.body.classList.add("ready");
  }

  async refreshDefs({ quiet = false } = {}) {
    try {
      const info = await this.api.objectInfo();
      this.graph.defs = new NodeDefs(info);
      if (!quiet) {
        this.canvas.render();
        this.notify("Node types reloaded");
      }
    } catch (err) {
      this.notify(`Cannot load the node types: ${err.message}`, "error");
    }
    this.palette.render();
  }

  _restore() {
    const raw = localStorage.getItem(AUTOSAVE_KEY);
    if (!raw) return false;
    try {
      const saved = JSON.parse(raw);
      return this.loadDocument(saved.workflow, { name: saved.name || "", view: saved.view, initial: true, quiet: true });
    } catch {
      return false;
    }
  }

  _fillExamples() {
    const select = $("#examples");
    select.replaceChildren(h("option", { value: "", text: "Examples…" }));
    for (const name of this.examples) select.append(h("option", { value: name, text: name }));
    select.disabled = !this.examples.length;
  }

  // --- documents ------------------------------------------------------------------------------------------------
  /** Replace the graph with a workflow document. initial: the history starts here (no undo back past it). */
  loadDocument(doc, { name = this.name, view = null, initial = false, quiet = false } = {}) {
    try {
      this.graph.load(doc);
    } catch (err) {
      if (!quiet) this.notify(`Cannot open this workflow: ${err.message}`, "error");
      return false;
    }
    this.name = name;
    this.canvas.state.clear();
    this.canvas.selection.clear();
    this.canvas.selectedLink = null;
    this.canvas.render();
    this._layoutMissing();
    if (view && typeof view.scale === "number") this.canvas.setView(view);
    else this.canvas.fitView();
    const unknown = [...new Set([...this.graph.nodes.values()].filter((n) => !this.graph.defs.get(n.type))
      .map((n) => n.type))];
    if (unknown.length && !quiet) this.notify(`Unknown node type(s): ${unknown.join(", ")}`, "warn");
    if (initial) {
      this.history.reset(this._snapshot());
      this._autosave();
      this._updateButtons();
    } else {
      this.commit();
    }
    this._showName();
    this.onSelectionChange();
    return true;
  }

  /** Nodes without a saved position get one: columns by link depth, left to right. */
  _layoutMissing() {
    const missing = [...this.graph.nodes.values()].filter((n) => !Array.isArray(n.ui.pos));
    if (!missing.length) return;
    const depth = new Map();
    const depthOf = (id, seen = new Set()) => {
      if (depth.has(id)) return depth.get(id);
      if (seen.has(id)) return 0;
      seen.add(id);
      const node = this.graph.node(id);
      let d = 0;
      for (const value of Object.values(node?.inputs || {})) {
        if (isLink(value) && this.graph.node(value.link[0])) d = Math.max(d, depthOf(value.link[0], seen) + 1);
      }
      depth.set(id, d);
      return d;
    };
    const placed = [...this.graph.nodes.values()].filter((n) => Array.isArray(n.ui.pos));
    const baseX = placed.length ? Math.max(...placed.map((n) => n.pos[0])) + 320 : 0;
    const columns = new Map();
    for (const node of missing) {
      const d = depthOf(node.id);
      const y = columns.get(d) || 0;
      node.pos = [baseX + d * 320, y];
      const view = this.canvas.views.get(node.id);
      const height = view ? view.el.offsetHeight : 160;
      columns.set(d, y + height + 40);
      if (view) {
        view.el.style.left = `${node.pos[0]}px`;
        view.el.style.top = `${node.pos[1]}px`;
      }
    }
    this.canvas.scheduleLinks();
  }

  async loadExample(name, { initial = false } = {}) {
    try {
      const doc = await this.api.workflow(name);
      return this.loadDocument(doc, { name, initial });
    } catch (err) {
      this.notify(`Cannot load example ${name}: ${err.message}`, "error");
      return false;
    }
  }

  newWorkflow() {
    this.loadDocument({ format: "nodegraph/workflow", version: 1, nodes: {} }, { name: "" });
  }

  toJSON() {
    return this.graph.toJSON();
  }

  save() {
    this._blurField();
    const text = `${JSON.stringify(this.graph.toJSON(), null, 2)}\n`;
    const blob = new Blob([text], { type: "application/json" });
    const url = URL.createObjectURL(blob);
    const a = h("a", { href: url, download: `${this.name || "workflow"}.json` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  open() {
    $("#file-open").click();
  }

  async openFile(file) {
    if (!file) return false;
    const stem = (file.name || "workflow").replace(/\.(json|png)$/i, "");
    try {
      const buffer = await file.arrayBuffer();
      const bytes = new Uint8Array(buffer);
      let doc;
      if (isPng(bytes)) {
        doc = await workflowFromPng(buffer);
        if (!doc) {
          this.notify(`${file.name} carries no workflow`, "error");
          return false;
        }
      } else {
        doc = JSON.parse(new TextDecoder().decode(bytes));
      }
      return this.loadDocument(doc, { name: stem });
    } catch (err) {
      this.notify(`Cannot open ${file.name}: ${err.message}`, "error");
      return false;
    }
  }

  // --- history and autosave -------------------------------------------------------------------------------------
  _snapshot() {
    return JSON.stringify(this.graph.toJSON());
  }

  /** Record a finished edit: a history step and an autosave. */
  commit() {
    this.history.push(this._snapshot());
    this._autosave();
    this._updateButtons();
    this.canvas.emptyHint.hidden = this.graph.nodes.size > 0;
    this.onSelectionChange();
  }

  /** A value changed while typing: autosave soon, no history step yet. */
  touch() {
    this.saveView();
  }

  saveView() {
    clearTimeout(this._saveTimer);
    this._saveTimer = setTimeout(() => this._autosave(), 400);
  }

  _autosave() {
    try {
      localStorage.setItem(AUTOSAVE_KEY, JSON.stringify({ workflow: this.graph.toJSON(), name: this.name,
        view: this.canvas.view }));
    } catch {
      /* storage full or disabled: autosave is best effort */
    }
  }

  undo() {
    const snapshot = this.history.undo();
    if (snapshot) this._applySnapshot(snapshot);
  }

  redo() {
    const snapshot = this.history.redo();
    if (snapshot) this._applySnapshot(snapshot);
  }

  _applySnapshot(snapshot) {
    this.graph.load(JSON.parse(snapshot));
    for (const id of [...this.canvas.state.keys()]) if (!this.graph.node(id)) this.canvas.state.delete(id);
    this.canvas.render();
    this._autosave();
    this._updateButtons();
    this.onSelectionChange();
  }

  _updateButtons() {
    $("#btn-undo").disabled = !this.history.canUndo();
    $("#btn-redo").disabled = !this.history.canRedo();
  }

  _showName() {
    $("#wf-name").textContent = this.name || "untitled";
    document.title = this.name ? `${this.name} – nodegraph` : "nodegraph";
  }

  // --- clipboard ------------------------------------------------------------------------------------------------
  copy() {
    if (!this.canvas.selection.size) return false;
    const fragment = this.graph.fragment(this.canvas.selection);
    this.clipboard = fragment;
    try {
      localStorage.setItem(CLIPBOARD_KEY, JSON.stringify(fragment));
    } catch {
      /* the in-memory copy still works */
    }
    return true;
  }

  paste({ keepExternal = false } = {}) {
    let fragment = this.clipboard;
    try {
      const stored = localStorage.getItem(CLIPBOARD_KEY);
      if (stored) fragment = JSON.parse(stored);
    } catch {
      /* keep the in-memory copy */
    }
    if (!fragment) return [];
    return this.canvas.paste(fragment, { keepExternal });
  }

  cut() {
    if (this.copy()) this.canvas.deleteSelection();
  }

  duplicate() {
    if (!this.canvas.selection.size) return [];
    const fragment = this.graph.fragment(this.canvas.selection);
    const [x, y] = fragment.origin;
    return this.canvas.paste(fragment, { at: [x + 30, y + 30] });
  }

  // --- running --------------------------------------------------------------------------------------------------
  _blurField() {
    const active = document.activeElement;
    if (active && active !== document.body && isTextEntry(active)) active.blur();
  }

  async run() {
    this._blurField(); // a field being edited reports its value on blur
    const doc = this.graph.toJSON();
    for (const [id] of this.canvas.state) this.canvas.setErrors(id, []);
    this._setBanner(null);
    let answer;
    try {
      answer = await this.api.queuePrompt(doc);
    } catch (err) {
      if (err.status === 400 && err.body && typeof err.body === "object") this.showValidationErrors(err.body);
      else this.notify(`Cannot queue the workflow: ${err.message}`, "error");
      return null;
    }
    this.counters.runs += 1;
    this._randomiseSeeds();
    this.notify(`Queued (#${answer.number})`);
    return answer;
  }

  _randomiseSeeds() {
    let changed = false;
    for (const node of this.graph.nodes.values()) {
      if (!node.ui.random_seed) continue;
      const spec = this.graph.defs.input(node.type, "seed");
      if (!spec || spec.kind !== "INT" || isLink(node.inputs.seed)) continue;
      node.inputs.seed = randomSeed(spec);
      this.canvas.refreshWidgets(node.id);
      changed = true;
    }
    if (changed) this.commit();
  }

  showValidationErrors(body) {
    const nodeErrors = body.node_errors || {};
    let count = 0;
    const general = [];
    for (const [id, entry] of Object.entries(nodeErrors)) {
      const errors = (entry.errors || []).map((e) => ({ type: e.type, message: e.message || e.details || e.type,
        input: e.extra_info?.input_name || null }));
      count += errors.length;
      if (id && this.graph.node(id)) this.canvas.setErrors(id, errors);
      else general.push(...errors.map((e) => e.message));
    }
    const message = body.error?.message || "the workflow is not valid";
    const extra = general.filter((m) => m !== message);
    const text = extra.length ? `${message}: ${extra.join("; ")}` : message;
    this._setBanner(text);
    this.notify(count ? `Not queued: ${count} problem(s) — see the marked nodes` : `Not queued: ${text}`, "error");
  }

  _setBanner(text) {
    const banner = $("#banner");
    banner.hidden = !text;
    banner.querySelector(".banner-text").textContent = text || "";
  }

  async interrupt() {
    try {
      await this.api.interrupt();
    } catch (err) {
      this.notify(`Cannot stop: ${err.message}`, "error");
    }
  }

  _bindSocket() {
    const api = this.api;
    const on = (type, fn) => api.addEventListener(type, (e) => {
      this.events.push({ type, data: e.detail });
      if (this.events.length > 500) this.events.shift();
      fn(e.detail || {});
    });
    on("connection", ({ connected }) => {
      const dot = $("#conn");
      dot.classList.toggle("on", connected);
      dot.title = connected ? "connected to the server" : "not connected (retrying)";
    });
    on("status", (data) => {
      const remaining = data.status?.exec_info?.queue_remaining ?? 0;
      const el = $("#queue");
      el.textContent = remaining ? `Queue: ${remaining}` : "Idle";
      el.classList.toggle("busy", remaining > 0);
      el.dataset.remaining = String(remaining);
      $("#btn-stop").disabled = remaining === 0;
    });
    on("execution_start", (data) => {
      this.current = { promptId: data.prompt_id, started: performance.now(), node: null };
      this.canvas.resetRun();
      this._setBanner(null);
      $("#run-status").textContent = "Running…";
    });
    on("execution_cached", (data) => {
      for (const id of data.nodes || []) this.canvas.setStatus(id, "cached");
    });
    on("executing", (data) => {
      const previous = this.current?.node;
      if (previous) this.canvas.setStatus(previous, "done");
      if (data.node === null || data.node === undefined) {
        if (this.current) this.current.node = null;
        return;
      }
      if (!this.current) this.current = { promptId: data.prompt_id, started: performance.now(), node: null };
      this.current.node = String(data.node);
      this.canvas.setStatus(this.current.node, "running");
    });
    on("progress", (data) => {
      if (data.node) this.canvas.setProgress(String(data.node), data.value, data.max);
    });
    on("executed", (data) => {
      const id = String(data.node);
      this.counters.executed += 1;
      this.canvas.setOutput(id, data.output || {});
      for (const image of data.output?.images || []) this._addToGallery(image, id);
    });
    on("execution_success", () => {
      const seconds = this.current ? (performance.now() - this.current.started) / 1000 : null;
      $("#run-status").textContent = seconds === null ? "Done" : `Done in ${seconds.toFixed(1)} s`;
      this.current = null;
    });
    on("execution_error", (data) => {
      const id = data.node_id !== undefined && data.node_id !== null ? String(data.node_id) : null;
      const message = data.exception_message || "failed";
      if (id && this.graph.node(id)) {
        this.canvas.setStatus(id, "");
        this.canvas.setErrors(id, [{ type: data.exception_type, message, input: null }]);
      }
      $("#run-status").textContent = "Failed";
      this.notify(`${id ? `${this.canvas.titleOf(id)} failed` : "The run failed"}: ${message}`, "error");
      if (this.current) this.current.node = null;
    });
    on("execution_interrupted", () => {
      $("#run-status").textContent = "Stopped";
      this.notify("Run stopped");
      if (this.current?.node) this.canvas.setStatus(this.current.node, "");
      this.current = null;
    });
    api.addEventListener("preview", (e) => {
      const id = this.current?.node;
      if (!id) return;
      this.counters.previews += 1;
      this.canvas.setPreview(id, URL.createObjectURL(e.detail.blob));
    });
  }

  // --- gallery, help, popups --------------------------------------------------------------------------------------
  _addToGallery(image, nodeId) {
    const url = this.api.viewUrl(image);
    // a cached output is announced again on every run: show each file once, most recent first
    this.gallery = this.gallery.filter((entry) => entry.url !== url);
    this.gallery.unshift({ url, image, nodeId, title: this.canvas.titleOf(nodeId), time: new Date() });
    this.gallery.length = Math.min(this.gallery.length, GALLERY_LIMIT);
    this._renderGallery();
  }

  _renderGallery() {
    const panel = $("#panel-gallery");
    panel.replaceChildren();
    $("#gallery-count").textContent = this.gallery.length ? String(this.gallery.length) : "";
    if (!this.gallery.length) {
      panel.append(h("div", { class: "panel-empty", text: "Images from your runs appear here." }));
      return;
    }
    const grid = h("div", { class: "gallery-grid" });
    for (const entry of this.gallery) {
      const img = h("img", { src: entry.url, alt: entry.image.filename, title: `${entry.image.filename} — ${entry.title}`,
        loading: "lazy", class: "gallery-image" });
      img.addEventListener("click", () => this.showImage(entry.url, entry.image));
      grid.append(img);
    }
    panel.append(grid);
  }

  showImage(url, image = {}) {
    const box = $("#lightbox");
    box.querySelector("img").src = url;
    box.querySelector(".lightbox-caption").textContent = image.filename || "";
    box.querySelector("a").href = url;
    box.hidden = false;
  }

  selectTab(name) {
    for (const button of document.querySelectorAll(".side-tabs button")) {
      button.classList.toggle("active", button.dataset.tab === name);
    }
    $("#panel-info").hidden = name !== "info";
    $("#panel-gallery").hidden = name !== "gallery";
  }

  onSelectionChange() {
    if (!$("#panel-info")) return;
    const ids = [...this.canvas.selection];
    if (ids.length === 1) {
      const node = this.graph.node(ids[0]);
      if (node) this.showHelp(node.type, { transient: true, nodeId: node.id });
      return;
    }
    const panel = $("#panel-info");
    panel.replaceChildren();
    if (ids.length > 1) {
      panel.append(h("h3", { text: `${ids.length} nodes selected` }),
        h("p", { class: "muted", text: "Drag one to move them all; Delete removes them; Ctrl+C copies them." }));
      return;
    }
    const links = this.graph.links().length;
    panel.append(h("h3", { text: this.name || "untitled workflow" }),
      h("p", { class: "muted", text: `${this.graph.nodes.size} node(s), ${links} link(s). Select a node to see its `
        + "help; hover a palette entry to read about it." }),
      this._shortcutTable());
  }

  _shortcutTable() {
    const list = h("dl", { class: "shortcuts" });
    for (const [keys, what] of SHORTCUTS) list.append(h("dt", {}, h("kbd", { text: keys })), h("dd", { text: what }));
    return list;
  }

  showHelp(type, { transient = false, nodeId = null } = {}) {
    const def = this.graph.defs.get(type);
    const panel = $("#panel-info");
    if (!transient) this.selectTab("info");
    panel.replaceChildren();
    if (!def) {
      panel.append(h("h3", { text: type }), h("p", { class: "error-text", text: "This node type is not known to the "
        + "server: the node is kept as it is, but the workflow cannot run until the type is available." }));
      return;
    }
    const title = nodeId ? this.canvas.titleOf(nodeId) : def.display_name;
    panel.append(h("h3", { text: title }),
      h("div", { class: "help-meta" }, h("code", { text: def.name }), h("span", { text: def.category }),
        nodeId ? h("span", { text: `#${nodeId}` }) : null, def.output_node ? h("span", { class: "tag", text: "output" }) : null),
      h("p", { class: "help-desc", text: def.description || "No description." }));
    if (def.inputs.length) {
      const list = h("dl", { class: "help-io" });
      for (const spec of def.inputs) {
        const bits = [spec.kind === "socket" ? spec.type : spec.kind];
        if (spec.kind === "COMBO" && spec.accepts_other) bits.push("or other values");
        if (spec.min !== undefined && spec.min !== null) bits.push(`min ${spec.min}`);
        if (spec.max !== undefined && spec.max !== null) bits.push(`max ${spec.max}`);
        if (spec.step) bits.push(`step ${spec.step}`);
        if (spec.default !== undefined && spec.kind !== "LIST") bits.push(`default ${JSON.stringify(spec.default)}`);
        if (spec.optional) bits.push("optional");
        if (spec.kind !== "socket") bits.push(`link: ${inputAccepts(spec).join("/")}`);
        list.append(h("dt", { text: spec.name }), h("dd", { text: bits.join(" · ") + (spec.tooltip ? ` — ${spec.tooltip}` : "") }));
      }
      panel.append(h("h4", { text: "Inputs" }), list);
    }
    if (def.outputs.length) {
      const list = h("dl", { class: "help-io" });
      for (const out of def.outputs) list.append(h("dt", { text: out.name }), h("dd", { text: out.type }));
      panel.append(h("h4", { text: "Outputs" }), list);
    }
  }

  menu(x, y, items) {
    this.closePopups();
    const menu = h("div", { class: "ng-popup ng-menu" });
    for (const item of items) {
      if (item.element) {
        menu.append(item.element);
        continue;
      }
      const button = h("button", { type: "button", class: `ng-menu-item${item.danger ? " danger" : ""}` },
        h("span", { text: item.label }), item.shortcut ? h("kbd", { text: item.shortcut }) : null);
      button.addEventListener("click", () => {
        this.closePopups();
        item.action();
      });
      menu.append(button);
    }
    document.body.append(menu);
    const rect = menu.getBoundingClientRect();
    menu.style.left = `${Math.min(x, window.innerWidth - rect.width - 4)}px`;
    menu.style.top = `${Math.min(y, window.innerHeight - rect.height - 4)}px`;
    this._menu = menu;
  }

  quickAdd(x, y, filter, onPick) {
    this.closePopups();
    this.quick.open(x, y, filter, onPick);
  }

  closePopups(target = null) {
    if (target && target.closest?.(".ng-popup")) return;
    if (this._menu) {
      this._menu.remove();
      this._menu = null;
    }
    if (this.quick.isOpen) this.quick.close();
  }

  notify(message, kind = "info") {
    const toast = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status", text: message });
    $("#toasts").append(toast);
    const ttl = kind === "error" ? 7000 : 2500;
    setTimeout(() => toast.classList.add("leaving"), ttl);
    setTimeout(() => toast.remove(), ttl + 400);
    toast.addEventListener("click", () => toast.remove());
  }

  onViewChange() {
    const zoom = $("#zoom");
    if (zoom && this.canvas) zoom.textContent = `${Math.round(this.canvas.view.scale * 100)}%`;
  }

  // --- UI bindings ----------------------------------------------------------------------------------------------
  _bindUi() {
    const click = (sel, fn) => $(sel).addEventListener("click", fn);
    click("#btn-new", () => this.newWorkflow());
    click("#btn-open", () => this.open());
    click("#btn-save", () => this.save());
    click("#btn-undo", () => this.undo());
    click("#btn-redo", () => this.redo());
    click("#btn-fit", () => this.canvas.fitView());
    click("#btn-run", () => this.run());
    click("#btn-stop", () => this.interrupt());
    click("#btn-refresh", () => this.refreshDefs());
    click("#btn-help", () => {
      document.body.classList.remove("side-hidden");
      this.canvas.setSelection([]);
      this.selectTab("info");
    });
    click("#banner-close", () => this._setBanner(null));
    const sidePanel = (hidden) => {
      document.body.classList.toggle("side-hidden", hidden);
      localStorage.setItem("nodegraph.sideHidden", hidden ? "1" : "");
      this.canvas.scheduleLinks();
    };
    sidePanel(!!localStorage.getItem("nodegraph.sideHidden"));
    click("#btn-panel", () => sidePanel(!document.body.classList.contains("side-hidden")));
    $("#examples").addEventListener("change", (e) => {
      const name = e.target.value;
      e.target.value = "";
      if (name) this.loadExample(name);
      this.canvas.root.focus();
    });
    $("#file-open").addEventListener("change", async (e) => {
      const file = e.target.files[0];
      e.target.value = "";
      await this.openFile(file);
    });
    for (const button of document.querySelectorAll(".side-tabs button")) {
      button.addEventListener("click", () => this.selectTab(button.dataset.tab));
    }
    const lightbox = $("#lightbox");
    lightbox.addEventListener("click", (e) => {
      if (e.target.tagName !== "A") lightbox.hidden = true;
    });
    this._renderGallery();

    // files dropped on the canvas: a workflow .json or a generated PNG
    const root = this.canvas.root;
    root.addEventListener("dragover", (e) => {
      if (![...e.dataTransfer.types].includes("Files")) return;
      e.preventDefault();
      e.dataTransfer.dropEffect = "copy";
      root.classList.add("drop-hover");
    });
    root.addEventListener("dragleave", (e) => {
      if (e.target === root) root.classList.remove("drop-hover");
    });
    root.addEventListener("drop", async (e) => {
      root.classList.remove("drop-hover");
      const file = e.dataTransfer?.files?.[0];
      if (!file) return;
      e.preventDefault();
      await this.openFile(file);
    });
    // a file dropped elsewhere must not navigate away from the canvas
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());

    document.addEventListener("pointerdown", (e) => this.closePopups(e.target), true);
    document.addEventListener("keydown", (e) => this._onKey(e));
    window.addEventListener("beforeunload", () => this._autosave());
  }

  _onKey(e) {
    const mod = e.ctrlKey || e.metaKey;
    const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
    if (mod && key === "Enter") {
      e.preventDefault();
      this.run();
      return;
    }
    if (key === "Escape") {
      this.closePopups();
      $("#lightbox").hidden = true;
      if (isTextEntry(document.activeElement)) document.activeElement.blur();
      return;
    }
    if (isTextEntry(e.target) || e.target.closest?.(".ng-popup")) return; // typing: the keys are the field's
    if (mod && key === "z") {
      e.preventDefault();
      if (e.shiftKey) this.redo();
      else this.undo();
    } else if (mod && key === "y") {
      e.preventDefault();
      this.redo();
    } else if (mod && key === "c") {
      if (this.copy()) e.preventDefault();
    } else if (mod && key === "x") {
      e.preventDefault();
      this.cut();
    } else if (mod && key === "v") {
      e.preventDefault();
      this.paste({ keepExternal: e.shiftKey });
    } else if (mod && key === "d") {
      e.preventDefault();
      this.duplicate();
    } else if (mod && key === "a") {
      e.preventDefault();
      this.canvas.selectAll();
    } else if (mod && key === "s") {
      e.preventDefault();
      this.save();
    } else if (mod && key === "o") {
      e.preventDefault();
      this.open();
    } else if (!mod && (key === "Delete" || key === "Backspace")) {
      if (this.canvas.deleteSelection()) e.preventDefault();
    } else if (!mod && !e.altKey && key === ".") {
      e.preventDefault();
      this.canvas.fitView();
      this.saveView();
    }
  }
}

const app = new App();
window.nodegraph = { app };
