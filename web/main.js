// The application: wires the graph model, the canvas, the palette, the side panel and the server together;
// saves, opens, autosaves; undo; the clipboard; keyboard shortcuts. Tests reach it as window.nodegraph.app.
//
// The App owns the page; the Canvas only gets the callbacks it is handed here (see CANVAS_HOOKS in canvas.js).

import { Api } from "./api.js";
import { Canvas, blurTextEntry, isTextEntry } from "./canvas.js";
import { Graph, History, NodeDefs, isLink } from "./graph.js";
import { Palette, QuickAdd } from "./palette.js";
import { Panels } from "./panels.js";
import { documentFromPng, isPng } from "./png.js";
import { Runner } from "./runner.js";
import { h } from "./widgets.js";

const AUTOSAVE_KEY = "nodegraph.autosave";
const CLIPBOARD_KEY = "nodegraph.clipboard";
const DEFAULT_WORKFLOW = "text-to-image";

const $ = (selector) => document.querySelector(selector);

export class App {
  constructor() {
    this.api = new Api();
    this.graph = new Graph(new NodeDefs());
    this.history = new History();
    this.canvas = new Canvas($("#canvas"), {
      graph: this.graph,
      api: this.api,
      commit: () => this.commit(),
      touch: () => this.touch(),
      saveView: () => this.saveView(),
      notify: (message, kind) => this.notify(message, kind),
      menu: (x, y, items) => this.panels.menu(x, y, items),
      quickAdd: (x, y, filter, onPick) => this.panels.quickAdd(x, y, filter, onPick),
      closePopups: (target) => this.panels.closePopups(target),
      showImage: (url, image) => this.panels.showImage(url, image),
      showHelp: (type) => this.showHelp(type),
      duplicate: () => this.duplicate(),
      copy: () => this.copy(),
      paste: () => this.paste(),
      onViewChange: () => this.onViewChange(),
      onSelectionChange: () => this.onSelectionChange(),
    });
    this.palette = new Palette(this, $("#palette"));
    this.quick = new QuickAdd(this);
    this.panels = new Panels({ graph: this.graph, canvas: this.canvas, quick: this.quick,
      workflowName: () => this.name });
    this.runner = new Runner({ api: this.api, graph: this.graph, canvas: this.canvas,
      notify: (message, kind) => this.notify(message, kind), commit: () => this.commit(),
      onImage: (image, nodeId) => this.panels.addToGallery(this.api.viewUrl(image), image, nodeId) });
    this.name = "";
    this.examples = [];
    this._saveTimer = null;
    this.ready = this.init();
  }

  /** The last websocket messages, for tests and debugging. */
  get events() {
    return this.runner.events;
  }

  get counters() {
    return this.runner.counters;
  }

  // --- start-up -------------------------------------------------------------------------------------------------
  async init() {
    this._bindUi();
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
    this.canvas.run.prune({ all: true });
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
    blurTextEntry();
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
        doc = await documentFromPng(buffer);
        if (!doc) {
          this.notify(`${file.name} carries no workflow`, "error");
          return false;
        }
      } else {
        doc = JSON.parse(new TextDecoder().decode(bytes));
      }
      // anything but ours (a ComfyUI workflow, editor or API format) is converted by the server's importer
      const ours = doc && typeof doc === "object" && doc.format === "nodegraph/workflow";
      if (!ours) doc = await this.api.importDocument(doc);
      const opened = this.loadDocument(doc, { name: stem });
      if (opened && !ours) this.notify(`Imported ${file.name} from ComfyUI`);
      return opened;
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
    this.canvas.run.prune();
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

  // --- running, help, popups ------------------------------------------------------------------------------------
  run() {
    return this.runner.run();
  }

  interrupt() {
    return this.runner.interrupt();
  }

  notify(message, kind = "info") {
    this.panels.notify(message, kind);
  }

  showHelp(type, options = {}) {
    this.panels.showHelp(type, options);
  }

  onSelectionChange() {
    this.panels?.showSelection();
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
      this.panels.selectTab("info");
    });
    click("#banner-close", () => this.runner.setBanner(null));
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

    // files dropped on the canvas: a workflow .json or a generated PNG, ours or ComfyUI's
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

    document.addEventListener("pointerdown", (e) => this.panels.closePopups(e.target), true);
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
      this.panels.closePopups();
      this.panels.hideImage();
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
