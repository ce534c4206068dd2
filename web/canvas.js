// The canvas: nodes as DOM elements on a pannable, zoomable world; links as SVG curves under them.
//
// Mouse: drag a node's title or body to move it (with the whole selection); click selects, shift/ctrl-click adds
// or removes; shift/ctrl-drag on the background draws a selection box; drag the background or use the middle
// button to pan; the wheel zooms around the pointer. Drag from an output socket to an input (or back) to link;
// compatible sockets light up while dragging; dropping on empty space offers the nodes that fit. Drag a linked
// input away to pick its link up (drop it on nothing to remove it); click a link to select it, then Delete or its
// "×" removes it. Double-click the background to add a node, a title to rename it; right-click for a menu.

import { inputAccepts, isLink } from "./graph.js";
import { createWidget, h } from "./widgets.js";

const MIN_SCALE = 0.1;
const MAX_SCALE = 3;
const DRAG_THRESHOLD = 4;
const SWATCHES = ["#3a4a6b", "#3b5e46", "#6b3a3a", "#6b5a2e", "#4f3b6b", "#2e5f66", "#555b66"];

export function typeColor(type) {
  const first = String(type || "*").split("/")[0];
  if (first === "*") return "#9aa4b1";
  let hash = 0;
  for (const ch of first) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return `hsl(${hash % 360}, 62%, 64%)`;
}

/** A colour from a workflow, only when it is one (a workflow must not make the page fetch URLs). */
export function safeColor(value) {
  return typeof value === "string" && value.length < 64 && !/url\(/i.test(value) && CSS.supports("color", value)
    ? value : null;
}

function isTextEntry(el) {
  return !!el && (el.tagName === "TEXTAREA" || el.tagName === "SELECT" || el.isContentEditable
    || (el.tagName === "INPUT" && !["checkbox", "button", "file", "radio"].includes(el.type)));
}

export { isTextEntry };

export class Canvas {
  constructor(app, root) {
    this.app = app;
    this.root = root;
    this.view = { x: 0, y: 0, scale: 1 };
    this.selection = new Set();
    this.selectedLink = null;
    this.views = new Map();
    this.state = new Map();
    this.pointer = { x: 0, y: 0 };
    this.drag = null;
    this._linksQueued = false;

    root.classList.add("ng-canvas");
    root.tabIndex = 0;
    this.linkSvg = this._svg("ng-links");
    this.linkGroup = document.createElementNS("http://www.w3.org/2000/svg", "g");
    this.linkSvg.append(this.linkGroup);
    this.world = h("div", { class: "ng-world" });
    this.decor = h("div", { class: "ng-decor" });
    this.nodesLayer = h("div", { class: "ng-nodes" });
    this.linkDelete = h("button", { class: "ng-link-delete", type: "button", title: "remove this link", text: "×",
      hidden: true });
    this.world.append(this.decor, this.nodesLayer, this.linkDelete);
    this.overlay = this._svg("ng-overlay");
    this.dragPath = document.createElementNS("http://www.w3.org/2000/svg", "path");
    this.dragPath.classList.add("ng-drag-link");
    this.overlay.append(this.dragPath);
    this.box = h("div", { class: "ng-select-box", hidden: true });
    this.emptyHint = h("div", { class: "ng-empty-hint" },
      h("div", { class: "big", text: "Empty canvas" }),
      h("div", { text: "Add nodes from the palette, double-click here to search, or drop a workflow .json or a "
        + "generated PNG." }));
    root.append(this.linkSvg, this.world, this.overlay, this.box, this.emptyHint);

    this.resizeObserver = new ResizeObserver((entries) => {
      for (const entry of entries) {
        const view = this.views.get(entry.target.dataset.id);
        if (view) view.dirty = true;
      }
      this.scheduleLinks();
    });

    root.addEventListener("pointerdown", (e) => this._onPointerDown(e));
    // moves and releases are followed on the window (not by pointer capture, which would retarget the clicks and
    // double-clicks that follow a press to the canvas itself)
    window.addEventListener("pointermove", (e) => this._onPointerMove(e));
    window.addEventListener("pointerup", (e) => this._onPointerUp(e));
    window.addEventListener("pointercancel", (e) => this._onPointerUp(e, true));
    root.addEventListener("wheel", (e) => this._onWheel(e), { passive: false });
    root.addEventListener("dblclick", (e) => this._onDoubleClick(e));
    root.addEventListener("contextmenu", (e) => this._onContextMenu(e));
    this.linkDelete.addEventListener("click", () => this.deleteSelectedLink());
    window.addEventListener("resize", () => this.scheduleLinks());
    this.applyView();
  }

  _svg(cls) {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.classList.add(cls);
    return svg;
  }

  get graph() {
    return this.app.graph;
  }

  // --- view -----------------------------------------------------------------------------------------------------
  applyView() {
    const { x, y, scale } = this.view;
    this.world.style.transform = `translate(${x}px, ${y}px) scale(${scale})`;
    this.linkGroup.setAttribute("transform", `translate(${x} ${y}) scale(${scale})`);
    const grid = 24 * scale;
    this.root.style.backgroundSize = `${grid}px ${grid}px, ${grid * 5}px ${grid * 5}px`;
    this.root.style.backgroundPosition = `${x}px ${y}px, ${x}px ${y}px`;
    this.root.dataset.scale = scale.toFixed(3);
    this.app.onViewChange?.();
  }

  setView(view) {
    this.view = { x: view.x || 0, y: view.y || 0, scale: Math.min(MAX_SCALE, Math.max(MIN_SCALE, view.scale || 1)) };
    this.applyView();
  }

  screenToWorld(clientX, clientY) {
    const rect = this.root.getBoundingClientRect();
    return [(clientX - rect.left - this.view.x) / this.view.scale, (clientY - rect.top - this.view.y) / this.view.scale];
  }

  worldCenter() {
    const rect = this.root.getBoundingClientRect();
    return this.screenToWorld(rect.left + rect.width / 2, rect.top + rect.height / 2);
  }

  zoomAt(clientX, clientY, factor) {
    const rect = this.root.getBoundingClientRect();
    const px = clientX - rect.left;
    const py = clientY - rect.top;
    const scale = Math.min(MAX_SCALE, Math.max(MIN_SCALE, this.view.scale * factor));
    const wx = (px - this.view.x) / this.view.scale;
    const wy = (py - this.view.y) / this.view.scale;
    this.view = { x: px - wx * scale, y: py - wy * scale, scale };
    this.applyView();
  }

  /** The bounding box of everything on the canvas, in world units (null when it is empty). */
  bounds(ids = null) {
    let x0 = Infinity;
    let y0 = Infinity;
    let x1 = -Infinity;
    let y1 = -Infinity;
    const add = (x, y, w, hh) => {
      x0 = Math.min(x0, x);
      y0 = Math.min(y0, y);
      x1 = Math.max(x1, x + w);
      y1 = Math.max(y1, y + hh);
    };
    for (const [id, view] of this.views) {
      if (ids && !ids.has(id)) continue;
      const [x, y] = this.graph.node(id).pos;
      add(x, y, view.el.offsetWidth, view.el.offsetHeight);
    }
    if (!ids) {
      for (const g of this.graph.groups || []) {
        if (Array.isArray(g?.bounding) && g.bounding.length >= 4) add(...g.bounding.slice(0, 4));
      }
      for (const el of this.decor.querySelectorAll(".ng-note")) {
        add(el.offsetLeft, el.offsetTop, el.offsetWidth, el.offsetHeight);
      }
    }
    return Number.isFinite(x0) ? { x: x0, y: y0, w: x1 - x0, h: y1 - y0 } : null;
  }

  fitView() {
    const ids = this.selection.size > 1 ? this.selection : null;
    const box = this.bounds(ids);
    const rect = this.root.getBoundingClientRect();
    if (!box || !rect.width) {
      this.setView({ x: rect.width / 2, y: rect.height / 2, scale: 1 });
      return;
    }
    const margin = 48;
    const scale = Math.min(1.25, Math.max(MIN_SCALE, Math.min((rect.width - 2 * margin) / Math.max(box.w, 1),
      (rect.height - 2 * margin) / Math.max(box.h, 1))));
    this.setView({ x: rect.width / 2 - (box.x + box.w / 2) * scale, y: rect.height / 2 - (box.y + box.h / 2) * scale,
      scale });
  }

  // --- rendering ------------------------------------------------------------------------------------------------
  render() {
    for (const view of this.views.values()) this.resizeObserver.unobserve(view.el);
    this.views.clear();
    this.nodesLayer.replaceChildren();
    for (const id of [...this.selection]) if (!this.graph.node(id)) this.selection.delete(id);
    if (this.selectedLink && !this.graph.node(this.selectedLink.to)) this.selectedLink = null;
    for (const node of this.graph.nodes.values()) this._mount(node.id);
    this.renderDecor();
    this.emptyHint.hidden = this.graph.nodes.size > 0;
    this.scheduleLinks();
  }

  /** Build (or rebuild) one node's element. */
  renderNode(id) {
    const old = this.views.get(id);
    const node = this.graph.node(id);
    if (old) {
      this.resizeObserver.unobserve(old.el);
      if (!node) {
        old.el.remove();
        this.views.delete(id);
      }
    }
    if (node) this._mount(id, old?.el);
    this.emptyHint.hidden = this.graph.nodes.size > 0;
    this.scheduleLinks();
  }

  _mount(id, replace = null) {
    const node = this.graph.node(id);
    const def = this.graph.def(id);
    const el = h("div", { class: "ng-node", "data-id": id, "data-type": node.type });
    if (!def) el.classList.add("unknown");
    if (def?.output_node) el.classList.add("output-node");
    if (!this.graph.inputSpecs(id).some((s) => s.kind !== "socket")) el.classList.add("narrow");
    if (node.ui.collapsed) el.classList.add("collapsed");
    if (this.selection.has(id)) el.classList.add("selected");
    const view = { el, sockets: { in: new Map(), out: new Map() }, rows: new Map(), widgets: new Map(), offsets: null,
      dirty: true };

    // title bar
    const titleText = h("span", { class: "ng-title-text", text: this.titleOf(id) });
    const toggle = h("button", { class: "ng-collapse", type: "button", title: "collapse / expand",
      text: node.ui.collapsed ? "▸" : "▾" });
    toggle.addEventListener("click", (e) => {
      e.stopPropagation();
      this.toggleCollapse(id);
    });
    const badge = h("span", { class: "ng-badge" });
    const progress = h("div", { class: "ng-progress" }, h("div", { class: "ng-progress-bar" }));
    const title = h("div", { class: "ng-title", title: def ? (def.description || def.name) : `unknown node type ${node.type}` },
      toggle, titleText, badge, progress);
    if (safeColor(node.ui.color)) title.style.background = safeColor(node.ui.color);
    const idTag = h("span", { class: "ng-id", text: `#${id}` });
    title.insertBefore(idTag, badge);
    el.append(title);
    view.title = title;
    view.titleText = titleText;
    view.badge = badge;
    view.progress = progress;

    const body = h("div", { class: "ng-body" });
    const specs = this.graph.inputSpecs(id);
    const sockets = specs.filter((s) => s.kind === "socket");
    const widgets = specs.filter((s) => s.kind !== "socket");
    const outputs = this.graph.outputSpecs(id);
    const slots = h("div", { class: "ng-slots" });
    for (let i = 0; i < Math.max(sockets.length, outputs.length); i++) {
      const row = h("div", { class: "ng-slot-row" });
      const spec = sockets[i];
      if (spec) {
        const dot = this._socket(id, "in", spec.name, spec.type);
        const slot = h("div", { class: "ng-slot in", "data-input": spec.name, title: this._inputTitle(spec) }, dot,
          h("span", { class: "ng-slot-label", text: spec.name + (spec.optional ? "?" : "") }));
        view.sockets.in.set(spec.name, dot);
        view.rows.set(spec.name, slot);
        row.append(slot);
      } else {
        row.append(h("div", { class: "ng-slot in empty" }));
      }
      const out = outputs[i];
      if (out) {
        const dot = this._socket(id, "out", out.name, out.type);
        const slot = h("div", { class: "ng-slot out", "data-output": out.name, title: out.type },
          h("span", { class: "ng-slot-label", text: out.name }), dot);
        view.sockets.out.set(out.name, dot);
        row.append(slot);
      }
      slots.append(row);
    }
    if (slots.childElementCount) body.append(slots);

    if (widgets.length) {
      const list = h("div", { class: "ng-widgets" });
      for (const spec of widgets) list.append(this._widgetRow(id, spec, view));
      body.append(list);
    }
    view.output = h("div", { class: "ng-output" });
    view.errors = h("div", { class: "ng-errors" });
    body.append(view.output, view.errors);
    el.append(body, h("div", { class: "ng-resize", title: "resize" }));

    this._place(el, node);
    if (replace && replace.parentNode) replace.replaceWith(el);
    else this.nodesLayer.append(el);
    this.views.set(id, view);
    this.resizeObserver.observe(el);
    this._applyState(id);
    return view;
  }

  _place(el, node) {
    const [x, y] = node.pos;
    el.style.left = `${x}px`;
    el.style.top = `${y}px`;
    const size = Array.isArray(node.ui.size) ? node.ui.size : null;
    el.style.width = size && size[0] ? `${size[0]}px` : "";
    el.style.minHeight = size && size[1] && !node.ui.collapsed ? `${size[1]}px` : "";
  }

  _inputTitle(spec) {
    const accepts = inputAccepts(spec).join(" or ");
    return [`${spec.name}${spec.optional ? " (optional)" : ""}`, spec.tooltip, `a link may carry ${accepts}`]
      .filter(Boolean).join("\n");
  }

  _socket(id, dir, name, type) {
    const dot = h("span", { class: `ng-socket ${dir}`, "data-node": id, "data-dir": dir, "data-name": name,
      "data-type": type || "*" });
    dot.style.setProperty("--socket-color", typeColor(type));
    return dot;
  }

  _widgetRow(id, spec, view) {
    const node = this.graph.node(id);
    const link = node.link(spec.name);
    const accepts = inputAccepts(spec);
    const row = h("div", { class: "ng-widget-row", "data-input": spec.name, title: this._inputTitle(spec) });
    const known = spec.kind !== "unknown";
    const dot = this._socket(id, "in", spec.name, accepts[0]);
    dot.classList.add("widget-socket");
    if (known) view.sockets.in.set(spec.name, dot);
    const label = h("span", { class: "ng-widget-label", text: spec.name + (spec.optional ? "?" : "") });
    const control = h("div", { class: "ng-widget-control" });
    if (link) {
      row.classList.add("linked");
      const source = this.graph.node(link[0]);
      control.append(h("span", { class: "ng-linked", text: `← ${source ? this.titleOf(link[0]) : link[0]}.${link[1]}` }));
    } else {
      const widget = createWidget(spec, node.inputs[spec.name], this._widgetContext(id, spec.name));
      if (widget.wide) row.classList.add("wide");
      control.append(widget.el);
      view.widgets.set(spec.name, widget);
    }
    row.append(known ? dot : h("span", { class: "ng-socket-spacer" }), label, control,
      h("div", { class: "ng-input-error" }));
    view.rows.set(spec.name, row);
    return row;
  }

  _widgetContext(id, name) {
    return {
      api: this.app.api,
      notify: (msg, kind) => this.app.notify(msg, kind),
      onInput: (value) => {
        this.graph.setValue(id, name, value);
        this.app.touch();
      },
      onChange: (value) => {
        this.graph.setValue(id, name, value);
        this.clearInputError(id, name);
        this.app.commit();
      },
      onResize: () => this.scheduleLinks(),
      seed: {
        get: () => !!this.graph.node(id)?.ui.random_seed,
        set: (on) => {
          const node = this.graph.node(id);
          if (!node) return;
          if (on) node.ui.random_seed = true;
          else delete node.ui.random_seed;
          this.app.commit();
        },
      },
    };
  }

  /** Refresh the widget values of a node from the graph (after a seed is randomised, say). */
  refreshWidgets(id) {
    const view = this.views.get(id);
    const node = this.graph.node(id);
    if (!view || !node) return;
    for (const [name, widget] of view.widgets) widget.set(node.inputs[name]);
  }

  titleOf(id) {
    const node = this.graph.node(id);
    if (!node) return String(id);
    const def = this.graph.defs.get(node.type);
    return node.ui.title || def?.display_name || node.type;
  }

  renderDecor() {
    this.decor.replaceChildren();
    for (const group of this.graph.groups || []) {
      if (!group || !Array.isArray(group.bounding)) continue;
      const [x, y, w, hh] = group.bounding;
      const el = h("div", { class: "ng-group" }, h("div", { class: "ng-group-title", text: group.title || "" }));
      Object.assign(el.style, { left: `${x}px`, top: `${y}px`, width: `${w}px`, height: `${hh}px` });
      if (safeColor(group.color)) el.style.setProperty("--group-color", safeColor(group.color));
      this.decor.append(el);
    }
    for (const note of this.graph.notes || []) {
      if (!note) continue;
      const [x, y] = Array.isArray(note.pos) ? note.pos : [0, 0];
      const el = h("div", { class: "ng-note", text: String(note.text ?? "") });
      Object.assign(el.style, { left: `${x}px`, top: `${y}px` });
      if (Array.isArray(note.size)) el.style.width = `${note.size[0]}px`;
      this.decor.append(el);
    }
  }

  // --- links ----------------------------------------------------------------------------------------------------
  scheduleLinks() {
    if (this._linksQueued) return;
    this._linksQueued = true;
    requestAnimationFrame(() => {
      this._linksQueued = false;
      this.drawLinks();
    });
  }

  _offsets(id) {
    const view = this.views.get(id);
    if (!view) return null;
    if (view.dirty || !view.offsets) {
      const scale = this.view.scale;
      const rect = view.el.getBoundingClientRect();
      const titleH = view.title.offsetHeight || 24;
      const width = view.el.offsetWidth;
      const offsets = { in: new Map(), out: new Map() };
      for (const dir of ["in", "out"]) {
        for (const [name, dot] of view.sockets[dir]) {
          const r = dot.getBoundingClientRect();
          if (r.width === 0 && r.height === 0) {
            offsets[dir].set(name, [dir === "in" ? 0 : width, titleH / 2]);
          } else {
            offsets[dir].set(name, [(r.left + r.width / 2 - rect.left) / scale, (r.top + r.height / 2 - rect.top) / scale]);
          }
        }
      }
      offsets.fallback = { in: [0, titleH / 2], out: [width, titleH / 2] };
      view.offsets = offsets;
      view.dirty = false;
    }
    return view.offsets;
  }

  socketPos(id, dir, name) {
    const node = this.graph.node(id);
    const offsets = this._offsets(id);
    if (!node || !offsets) return null;
    const [ox, oy] = offsets[dir].get(name) || offsets.fallback[dir];
    return [node.pos[0] + ox, node.pos[1] + oy];
  }

  _curve(a, b) {
    const d = Math.max(40, Math.abs(b[0] - a[0]) * 0.5);
    return `M ${a[0]} ${a[1]} C ${a[0] + d} ${a[1]}, ${b[0] - d} ${b[1]}, ${b[0]} ${b[1]}`;
  }

  drawLinks() {
    const ns = "http://www.w3.org/2000/svg";
    this.linkGroup.replaceChildren();
    let selectedMid = null;
    for (const link of this.graph.links()) {
      const a = this.socketPos(link.from, "out", link.output);
      const b = this.socketPos(link.to, "in", link.input);
      if (!a || !b) continue;
      const d = this._curve(a, b);
      const selected = this.selectedLink && this.selectedLink.to === link.to && this.selectedLink.input === link.input;
      const path = document.createElementNS(ns, "path");
      path.setAttribute("d", d);
      path.classList.add("ng-link");
      if (selected) path.classList.add("selected");
      if (this.selection.has(link.from) || this.selection.has(link.to)) path.classList.add("active");
      path.style.stroke = typeColor(link.type);
      const hit = document.createElementNS(ns, "path");
      hit.setAttribute("d", d);
      hit.classList.add("ng-link-hit");
      hit.dataset.to = link.to;
      hit.dataset.input = link.input;
      hit.dataset.from = link.from;
      hit.dataset.output = link.output;
      this.linkGroup.append(path, hit);
      if (selected) {
        const dd = Math.max(40, Math.abs(b[0] - a[0]) * 0.5);
        selectedMid = [(a[0] + 3 * (a[0] + dd) + 3 * (b[0] - dd) + b[0]) / 8, (a[1] * 4 + b[1] * 4) / 8];
      }
    }
    if (selectedMid) {
      this.linkDelete.hidden = false;
      this.linkDelete.style.left = `${selectedMid[0]}px`;
      this.linkDelete.style.top = `${selectedMid[1]}px`;
    } else {
      this.linkDelete.hidden = true;
      if (this.selectedLink) this.selectedLink = null;
    }
    // a linked socket is drawn filled
    for (const [id, view] of this.views) {
      const node = this.graph.node(id);
      for (const [name, dot] of view.sockets.in) dot.classList.toggle("connected", isLink(node.inputs[name]));
    }
    const used = new Set(this.graph.links().map((l) => `${l.from}\u0000${l.output}`));
    for (const [id, view] of this.views) {
      for (const [name, dot] of view.sockets.out) dot.classList.toggle("connected", used.has(`${id}\u0000${name}`));
    }
  }

  selectLink(to, input) {
    this.selectedLink = to === null ? null : { to, input };
    if (to !== null) this.setSelection([]);
    this.scheduleLinks();
  }

  deleteSelectedLink() {
    if (!this.selectedLink) return false;
    const { to, input } = this.selectedLink;
    this.selectedLink = null;
    if (this.graph.disconnect(to, input)) {
      this.renderNode(to);
      this.app.commit();
    }
    return true;
  }

  // --- selection ------------------------------------------------------------------------------------------------
  setSelection(ids) {
    this.selection = new Set([...ids].map(String).filter((id) => this.graph.node(id)));
    for (const [id, view] of this.views) view.el.classList.toggle("selected", this.selection.has(id));
    if (this.selection.size) this.selectedLink = null;
    this.scheduleLinks();
    this.app.onSelectionChange?.();
  }

  selectAll() {
    this.setSelection(this.graph.nodes.keys());
  }

  // --- editing --------------------------------------------------------------------------------------------------
  /** A free spot near `pos` for a new node: the nearest point on a 40px grid around it where a node-sized box
   * overlaps no other node. */
  _freeSpot(pos, size = [260, 160]) {
    const boxes = [];
    for (const [id, view] of this.views) {
      const [x, y] = this.graph.node(id).pos;
      boxes.push([x - 20, y - 20, x + view.el.offsetWidth + 20, y + view.el.offsetHeight + 20]);
    }
    const free = ([x, y]) => !boxes.some(([x0, y0, x1, y1]) => x < x1 && x + size[0] > x0 && y < y1 && y + size[1] > y0);
    if (free(pos)) return pos;
    for (let ring = 1; ring <= 30; ring++) {
      const candidates = [];
      for (let i = -ring; i <= ring; i++) {
        candidates.push([i, -ring], [i, ring], [-ring, i], [ring, i]);
      }
      candidates.sort((a, b) => Math.hypot(...a) - Math.hypot(...b));
      for (const [i, j] of candidates) {
        const spot = [pos[0] + i * 40, pos[1] + j * 40];
        if (free(spot)) return spot;
      }
    }
    return pos;
  }

  addNode(type, pos = null, { select = true, commit = true } = {}) {
    if (!pos) {
      const [cx, cy] = this.worldCenter();
      pos = [cx - 120, cy - 60];
    }
    const node = this.graph.addNode(type, this._freeSpot(pos));
    this.renderNode(node.id);
    if (select) this.setSelection([node.id]);
    if (commit) this.app.commit();
    return node.id;
  }

  deleteSelection() {
    if (this.selectedLink && !this.selection.size) return this.deleteSelectedLink();
    if (!this.selection.size) return false;
    const ids = [...this.selection];
    const affected = new Set();
    for (const id of ids) {
      for (const link of this.graph.links()) if (link.from === id) affected.add(link.to);
    }
    for (const id of ids) {
      this.graph.removeNode(id);
      this.state.delete(id);
    }
    this.selection.clear();
    for (const id of ids) this.renderNode(id);
    for (const id of affected) if (this.graph.node(id)) this.renderNode(id);
    this.app.onSelectionChange?.();
    this.app.commit();
    return true;
  }

  paste(fragment, { keepExternal = false, at = null } = {}) {
    if (!fragment || !fragment.nodes || !Object.keys(fragment.nodes).length) return [];
    const target = at || (this.pointer.inside ? [this.pointer.x, this.pointer.y] : this.worldCenter());
    const ids = this.graph.paste(fragment, target, { keepExternal });
    for (const id of ids) this.renderNode(id);
    this.setSelection(ids);
    this.app.commit();
    return ids;
  }

  toggleCollapse(id) {
    const node = this.graph.node(id);
    if (!node) return;
    if (node.ui.collapsed) delete node.ui.collapsed;
    else node.ui.collapsed = true;
    this.renderNode(id);
    this.app.commit();
  }

  setColor(id, color) {
    const node = this.graph.node(id);
    if (!node) return;
    if (color) node.ui.color = color;
    else delete node.ui.color;
    this.renderNode(id);
    this.app.commit();
  }

  rename(id) {
    const view = this.views.get(id);
    const node = this.graph.node(id);
    if (!view || !node) return;
    const input = h("input", { class: "ng-title-edit", type: "text", value: this.titleOf(id) });
    view.titleText.replaceWith(input);
    input.focus();
    input.select();
    let done = false;
    const finish = (save) => {
      if (done) return;
      done = true;
      const value = input.value.trim();
      const def = this.graph.def(id);
      if (save) {
        if (!value || value === (def?.display_name || node.type)) delete node.ui.title;
        else node.ui.title = value;
      }
      this.renderNode(id);
      // links show source titles
      for (const link of this.graph.links()) if (link.from === id) this.renderNode(link.to);
      if (save) this.app.commit();
    };
    input.addEventListener("keydown", (e) => {
      e.stopPropagation();
      if (e.key === "Enter") finish(true);
      if (e.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true));
  }

  // --- run state ------------------------------------------------------------------------------------------------
  _st(id) {
    let s = this.state.get(id);
    if (!s) {
      s = { status: "", progress: null, errors: [], output: null, preview: null };
      this.state.set(id, s);
    }
    return s;
  }

  _applyState(id) {
    const view = this.views.get(id);
    const s = this.state.get(id);
    if (!view) return;
    const el = view.el;
    el.classList.toggle("running", s?.status === "running");
    el.classList.toggle("cached", s?.status === "cached");
    el.classList.toggle("done", s?.status === "done");
    el.classList.toggle("has-error", !!(s && s.errors.length));
    view.badge.textContent = s?.status === "cached" ? "cached" : s?.errors.length ? "error" : "";
    view.badge.className = `ng-badge ${s?.errors.length ? "error" : s?.status || ""}`;
    const bar = view.progress.firstChild;
    if (s && s.progress && s.progress.max > 0) {
      view.progress.classList.add("visible");
      bar.style.width = `${Math.min(100, (100 * s.progress.value) / s.progress.max)}%`;
    } else {
      view.progress.classList.remove("visible");
      bar.style.width = "0";
    }
    // errors: all on the node, and each also on its input
    view.errors.replaceChildren();
    for (const row of view.rows.values()) {
      row.classList.remove("has-error");
      const slot = row.querySelector(".ng-input-error");
      if (slot) slot.textContent = "";
    }
    for (const err of s?.errors || []) {
      const where = err.input ? `${err.input}: ` : "";
      view.errors.append(h("div", { class: "ng-error", "data-input": err.input || "", text: where + err.message }));
      const row = err.input ? view.rows.get(err.input) : null;
      if (row) {
        row.classList.add("has-error");
        let slot = row.querySelector(".ng-input-error");
        if (!slot) {
          slot = h("div", { class: "ng-input-error" });
          row.append(slot);
        }
        slot.textContent = slot.textContent ? `${slot.textContent}\n${err.message}` : err.message;
      }
    }
    // outputs: images, text, or the live preview
    view.output.replaceChildren();
    const images = s?.output?.images || [];
    if (images.length) {
      const grid = h("div", { class: `ng-images n${Math.min(images.length, 4)}` });
      for (const image of images) {
        const url = this.app.api.viewUrl(image);
        const img = h("img", { class: "ng-image", src: url, alt: image.filename, draggable: "false",
          title: image.filename });
        img.addEventListener("load", () => this.scheduleLinks());
        img.addEventListener("click", () => this.app.showImage(url, image));
        grid.append(img);
      }
      view.output.append(grid);
    } else if (s?.preview) {
      const img = h("img", { class: "ng-image ng-preview", src: s.preview, alt: "preview", draggable: "false" });
      img.addEventListener("load", () => this.scheduleLinks());
      view.output.append(img);
    }
    for (const text of s?.output?.text || []) {
      view.output.append(h("pre", { class: "ng-text-output", text: String(text) }));
    }
  }

  setStatus(id, status) {
    if (!this.graph.node(id)) return;
    const s = this._st(id);
    s.status = status;
    if (status !== "running") {
      s.progress = null;
      // previews are live: they go when the node is done
      if (s.preview && s.preview.startsWith("blob:")) URL.revokeObjectURL(s.preview);
      s.preview = null;
    }
    this._applyState(id);
  }

  setProgress(id, value, max) {
    if (!this.graph.node(id)) return;
    this._st(id).progress = { value, max };
    this._applyState(id);
  }

  setOutput(id, output) {
    if (!this.graph.node(id)) return;
    const s = this._st(id);
    s.output = output;
    s.preview = null;
    this._applyState(id);
  }

  setPreview(id, url) {
    if (!this.graph.node(id)) return;
    const s = this._st(id);
    if (s.preview && s.preview.startsWith("blob:")) URL.revokeObjectURL(s.preview);
    s.preview = url;
    this._applyState(id);
  }

  setErrors(id, errors) {
    if (!this.graph.node(id)) return;
    this._st(id).errors = errors;
    this._applyState(id);
  }

  clearInputError(id, input) {
    const s = this.state.get(id);
    if (!s || !s.errors.length) return;
    const left = s.errors.filter((e) => e.input !== input);
    if (left.length !== s.errors.length) {
      s.errors = left;
      this._applyState(id);
    }
  }

  /** Forget statuses and errors before a run (outputs stay until new ones come). */
  resetRun({ keepOutputs = true } = {}) {
    for (const [id, s] of this.state) {
      s.status = "";
      s.progress = null;
      s.errors = [];
      if (!keepOutputs) s.output = null;
      if (s.preview && s.preview.startsWith("blob:")) URL.revokeObjectURL(s.preview);
      s.preview = null;
      this._applyState(id);
    }
  }

  // --- pointer interaction --------------------------------------------------------------------------------------
  _onPointerDown(e) {
    this.app.closePopups?.(e.target);
    const [wx, wy] = this.screenToWorld(e.clientX, e.clientY);
    this.pointer = { x: wx, y: wy, inside: true };
    if (this.drag) return;
    const t = e.target;
    if (e.button === 1) {
      e.preventDefault();
      this._startPan(e);
      return;
    }
    if (e.button !== 0) return;
    if (t.closest(".ng-link-delete")) return;
    const socket = t.closest(".ng-socket");
    if (socket && socket.dataset.node) {
      e.preventDefault();
      this._blurEditing();
      this._startLink(e, socket);
      return;
    }
    const nodeEl = t.closest(".ng-node");
    if (nodeEl) {
      if (t.closest(".ng-resize")) {
        e.preventDefault();
        this._startResize(e, nodeEl.dataset.id);
        return;
      }
      if (t.closest("input, textarea, select, button, label, .w-list, .ng-title-edit, a")) {
        // a widget: let it work; select the node quietly
        if (!this.selection.has(nodeEl.dataset.id) && !e.shiftKey) this.setSelection([nodeEl.dataset.id]);
        return;
      }
      e.preventDefault();
      this._blurEditing();
      this._startNodeDrag(e, nodeEl.dataset.id);
      return;
    }
    if (t.classList.contains("ng-link-hit")) {
      e.preventDefault();
      this._blurEditing();
      this.selectLink(t.dataset.to, t.dataset.input);
      return;
    }
    // the background
    e.preventDefault();
    this._blurEditing();
    this.root.focus({ preventScroll: true });
    if (e.shiftKey || e.ctrlKey || e.metaKey) this._startBox(e);
    else this._startPan(e, true);
  }

  _blurEditing() {
    const active = document.activeElement;
    if (active && active !== this.root && this.root.contains(active)) active.blur();
    if (document.activeElement === document.body || !document.activeElement) this.root.focus({ preventScroll: true });
  }

  _startPan(e, clickClears = false) {
    this.drag = { kind: "pan", sx: e.clientX, sy: e.clientY, vx: this.view.x, vy: this.view.y, moved: false,
      clickClears };
    this.root.classList.add("panning");
  }

  _startBox(e) {
    const rect = this.root.getBoundingClientRect();
    this.drag = { kind: "box", sx: e.clientX, sy: e.clientY, rect, additive: true, base: new Set(this.selection),
      moved: false };
  }

  _startNodeDrag(e, id) {
    const additive = e.shiftKey || e.ctrlKey || e.metaKey;
    let toggledOff = false;
    if (additive) {
      const next = new Set(this.selection);
      if (next.has(id)) {
        next.delete(id);
        toggledOff = true;
      } else next.add(id);
      this.setSelection(next);
    } else if (!this.selection.has(id)) {
      this.setSelection([id]);
    }
    if (toggledOff) return;
    const start = new Map();
    for (const sid of this.selection) start.set(sid, [...this.graph.node(sid).pos]);
    this.drag = { kind: "node", id, sx: e.clientX, sy: e.clientY, start, moved: false, additive };
  }

  _startResize(e, id) {
    const view = this.views.get(id);
    this.drag = { kind: "resize", id, sx: e.clientX, sy: e.clientY, w: view.el.offsetWidth, h: view.el.offsetHeight,
      moved: false };
  }

  _startLink(e, socket) {
    const id = socket.dataset.node;
    const name = socket.dataset.name;
    let drag;
    if (socket.dataset.dir === "out") {
      drag = { kind: "link", from: id, output: name, type: this.graph.outputType(id, name), reverse: false };
    } else {
      const node = this.graph.node(id);
      const link = node.link(name);
      if (link) {
        // pick the link up: it now hangs from its source
        this.graph.disconnect(id, name);
        this.renderNode(id);
        drag = { kind: "link", from: link[0], output: link[1], type: this.graph.outputType(link[0], link[1]),
          reverse: false, detached: { to: id, input: name } };
      } else {
        const spec = this.graph.inputSpec(id, name);
        drag = { kind: "link", to: id, input: name, accepts: inputAccepts(spec), reverse: true };
      }
    }
    drag.sx = e.clientX;
    drag.sy = e.clientY;
    this.drag = drag;
    this.root.classList.add("linking");
    this._markCompatible(drag);
    this._drawDragLink(e);
  }

  _compatible(drag, socket) {
    const id = socket.dataset.node;
    const name = socket.dataset.name;
    if (!drag.reverse) {
      if (socket.dataset.dir !== "in") return false;
      return this.graph.canConnect(drag.from, drag.output, id, name).ok;
    }
    if (socket.dataset.dir !== "out") return false;
    return this.graph.canConnect(id, name, drag.to, drag.input).ok;
  }

  _markCompatible(drag) {
    for (const socket of this.nodesLayer.querySelectorAll(".ng-socket")) {
      const ok = this._compatible(drag, socket);
      socket.classList.toggle("compatible", ok);
      socket.closest(".ng-slot, .ng-widget-row")?.classList.toggle("compatible", ok);
    }
  }

  _clearCompatible() {
    this.root.classList.remove("linking");
    for (const el of this.nodesLayer.querySelectorAll(".compatible, .hover-ok, .hover-bad")) {
      el.classList.remove("compatible", "hover-ok", "hover-bad");
    }
  }

  _drawDragLink(e) {
    const d = this.drag;
    const rect = this.root.getBoundingClientRect();
    const toScreen = ([x, y]) => [x * this.view.scale + this.view.x, y * this.view.scale + this.view.y];
    const mouse = [e.clientX - rect.left, e.clientY - rect.top];
    let a;
    let b;
    if (d.reverse) {
      a = mouse;
      b = toScreen(this.socketPos(d.to, "in", d.input));
    } else {
      a = toScreen(this.socketPos(d.from, "out", d.output));
      b = mouse;
    }
    this.dragPath.setAttribute("d", this._curve(a, b));
    this.dragPath.style.stroke = typeColor(d.reverse ? d.accepts[0] : d.type);
    this.dragPath.style.display = "";
    // hover feedback
    for (const el of this.nodesLayer.querySelectorAll(".hover-ok, .hover-bad")) el.classList.remove("hover-ok", "hover-bad");
    const target = this._dropSocket(e.clientX, e.clientY, d);
    if (target) target.classList.add(this._compatible(d, target) ? "hover-ok" : "hover-bad");
  }

  /** The socket a link drag would land on at a screen point: a socket, its row, or null. */
  _dropSocket(clientX, clientY, drag) {
    const el = document.elementFromPoint(clientX, clientY);
    if (!el) return null;
    const socket = el.closest(".ng-socket");
    if (socket && socket.dataset.node) return socket;
    const wantIn = !drag.reverse;
    const row = el.closest(wantIn ? ".ng-slot.in, .ng-widget-row" : ".ng-slot.out");
    if (row) return row.querySelector(".ng-socket[data-node]");
    return null;
  }

  _onPointerMove(e) {
    if (this.root.contains(e.target)) {
      const [wx, wy] = this.screenToWorld(e.clientX, e.clientY);
      this.pointer = { x: wx, y: wy, inside: true };
    } else if (!this.drag) {
      this.pointer.inside = false;
    }
    const d = this.drag;
    if (!d) return;
    const dx = e.clientX - d.sx;
    const dy = e.clientY - d.sy;
    if (!d.moved && Math.hypot(dx, dy) >= DRAG_THRESHOLD) d.moved = true;
    if (d.kind === "pan") {
      if (!d.moved) return;
      this.view.x = d.vx + dx;
      this.view.y = d.vy + dy;
      this.applyView();
    } else if (d.kind === "node") {
      if (!d.moved) return;
      const s = this.view.scale;
      for (const [id, [x, y]] of d.start) {
        const node = this.graph.node(id);
        node.pos = [x + dx / s, y + dy / s];
        const view = this.views.get(id);
        if (view) {
          view.el.style.left = `${node.pos[0]}px`;
          view.el.style.top = `${node.pos[1]}px`;
        }
      }
      this.scheduleLinks();
    } else if (d.kind === "resize") {
      const node = this.graph.node(d.id);
      const view = this.views.get(d.id);
      const s = this.view.scale;
      const w = Math.max(140, Math.round(d.w + dx / s));
      view.el.style.width = `${w}px`;
      const natural = view.el.scrollHeight;
      const hh = Math.max(40, Math.round(d.h + dy / s));
      node.ui.size = [w, Math.max(hh, 0)];
      view.el.style.minHeight = `${hh}px`;
      if (natural > hh) view.el.style.minHeight = "";
      view.dirty = true;
      this.scheduleLinks();
    } else if (d.kind === "box") {
      if (!d.moved) return;
      const x0 = Math.min(d.sx, e.clientX) - d.rect.left;
      const y0 = Math.min(d.sy, e.clientY) - d.rect.top;
      Object.assign(this.box.style, { left: `${x0}px`, top: `${y0}px`, width: `${Math.abs(dx)}px`,
        height: `${Math.abs(dy)}px` });
      this.box.hidden = false;
      const [ax, ay] = this.screenToWorld(Math.min(d.sx, e.clientX), Math.min(d.sy, e.clientY));
      const [bx, by] = this.screenToWorld(Math.max(d.sx, e.clientX), Math.max(d.sy, e.clientY));
      const picked = new Set(d.base);
      for (const [id, view] of this.views) {
        const [x, y] = this.graph.node(id).pos;
        const w = view.el.offsetWidth;
        const hh = view.el.offsetHeight;
        if (x < bx && x + w > ax && y < by && y + hh > ay) picked.add(id);
      }
      this.setSelection(picked);
    } else if (d.kind === "link") {
      this._drawDragLink(e);
    }
  }

  _onPointerUp(e, cancelled = false) {
    const d = this.drag;
    if (!d) return;
    this.drag = null;
    this.root.classList.remove("panning");
    if (d.kind === "pan") {
      if (!d.moved && d.clickClears) {
        this.setSelection([]);
        this.selectLink(null);
      }
      this.app.saveView?.();
    } else if (d.kind === "node") {
      if (d.moved) this.app.commit();
      else if (!d.additive) this.setSelection([d.id]);
    } else if (d.kind === "resize") {
      if (d.moved) this.app.commit();
    } else if (d.kind === "box") {
      this.box.hidden = true;
    } else if (d.kind === "link") {
      this.dragPath.style.display = "none";
      this._clearCompatible();
      if (!cancelled) this._dropLink(d, e);
    }
  }

  _dropLink(d, e) {
    const socket = this._dropSocket(e.clientX, e.clientY, d);
    const commitDetached = () => {
      if (d.detached) this.app.commit();
    };
    if (socket) {
      const id = socket.dataset.node;
      const name = socket.dataset.name;
      const dir = socket.dataset.dir;
      if (!d.reverse && dir === "in") {
        const result = this.graph.connect(d.from, d.output, id, name);
        if (result.ok) {
          this.renderNode(id);
          this.app.commit();
        } else {
          this.app.notify(`Cannot connect ${d.output} (${d.type}) to ${name}: ${result.reason}`, "error");
          if (d.detached) this._restoreDetached(d);
        }
        return;
      }
      if (d.reverse && dir === "out") {
        const result = this.graph.connect(id, name, d.to, d.input);
        if (result.ok) {
          this.renderNode(d.to);
          this.app.commit();
        } else {
          this.app.notify(`Cannot connect ${name} to ${d.input}: ${result.reason}`, "error");
        }
        return;
      }
      if (d.detached) this._restoreDetached(d);
      return;
    }
    // onto a node but not a socket: the first compatible input (free ones first)
    const el = document.elementFromPoint(e.clientX, e.clientY);
    const nodeEl = el?.closest(".ng-node");
    if (nodeEl && !d.reverse) {
      const id = nodeEl.dataset.id;
      const candidates = this.graph.inputSpecs(id).filter((s) => this.graph.canConnect(d.from, d.output, id, s.name).ok);
      const node = this.graph.node(id);
      const pick = candidates.find((s) => s.kind === "socket" && !node.link(s.name))
        || candidates.find((s) => !node.link(s.name)) || candidates[0];
      if (pick) {
        this.graph.connect(d.from, d.output, id, pick.name);
        this.renderNode(id);
        this.app.commit();
      } else {
        this.app.notify(`${this.titleOf(id)} has no input that accepts ${d.type}`, "error");
        commitDetached();
      }
      return;
    }
    if (nodeEl && d.reverse) {
      const id = nodeEl.dataset.id;
      const pick = this.graph.outputSpecs(id).find((o) => this.graph.canConnect(id, o.name, d.to, d.input).ok);
      if (pick) {
        this.graph.connect(id, pick.name, d.to, d.input);
        this.renderNode(d.to);
        this.app.commit();
      } else {
        this.app.notify(`${this.titleOf(id)} has no output that ${d.input} accepts`, "error");
      }
      return;
    }
    // empty space: a detached link is dropped; otherwise offer the nodes that fit
    if (d.detached) {
      this.app.commit();
      return;
    }
    const [wx, wy] = this.screenToWorld(e.clientX, e.clientY);
    const filter = d.reverse ? { output: d.accepts } : { input: d.type };
    this.app.quickAdd?.(e.clientX, e.clientY, filter, (type) => {
      const spot = d.reverse ? [wx - 260, wy - 20] : [wx + 10, wy - 20];
      const id = this.addNode(type, spot, { commit: false });
      if (d.reverse) {
        const out = this.graph.outputSpecs(id).find((o) => this.graph.canConnect(id, o.name, d.to, d.input).ok);
        if (out) this.graph.connect(id, out.name, d.to, d.input);
        this.renderNode(d.to);
      } else {
        const spec = this.graph.inputSpecs(id).find((s) => this.graph.canConnect(d.from, d.output, id, s.name).ok);
        if (spec) this.graph.connect(d.from, d.output, id, spec.name);
        this.renderNode(id);
      }
      this.app.commit();
    });
  }

  _restoreDetached(d) {
    const { to, input } = d.detached;
    this.graph.connect(d.from, d.output, to, input);
    this.renderNode(to);
  }

  _onWheel(e) {
    const t = e.target;
    if (t.closest?.(".ng-popup")) return;
    const scroller = t.closest?.("textarea, select, .w-list");
    if (scroller && scroller.scrollHeight > scroller.clientHeight + 1 && !e.ctrlKey) return;
    e.preventDefault();
    const delta = e.deltaMode === 1 ? e.deltaY * 16 : e.deltaY;
    this.zoomAt(e.clientX, e.clientY, Math.exp(-delta * 0.0015));
    this.app.saveView?.();
  }

  _onDoubleClick(e) {
    const t = e.target;
    const title = t.closest(".ng-title-text, .ng-id");
    if (title) {
      this.rename(title.closest(".ng-node").dataset.id);
      return;
    }
    if (t.closest(".ng-node") || t.closest(".ng-link-hit")) return;
    const [wx, wy] = this.screenToWorld(e.clientX, e.clientY);
    this.app.quickAdd?.(e.clientX, e.clientY, null, (type) => this.addNode(type, [wx, wy]));
  }

  _onContextMenu(e) {
    const t = e.target;
    if (t.closest("input, textarea")) return;
    e.preventDefault();
    const nodeEl = t.closest(".ng-node");
    const [wx, wy] = this.screenToWorld(e.clientX, e.clientY);
    this.pointer = { x: wx, y: wy, inside: true };
    if (nodeEl) {
      const id = nodeEl.dataset.id;
      if (!this.selection.has(id)) this.setSelection([id]);
      const node = this.graph.node(id);
      const swatches = h("div", { class: "ng-swatches" });
      for (const color of [null, ...SWATCHES]) {
        const sw = h("button", { type: "button", class: "ng-swatch", title: color || "default" });
        sw.style.background = color || "var(--node-title)";
        sw.addEventListener("click", () => {
          this.setColor(id, color);
          this.app.closePopups();
        });
        swatches.append(sw);
      }
      this.app.menu(e.clientX, e.clientY, [
        { label: "Rename", action: () => this.rename(id) },
        { label: node.ui.collapsed ? "Expand" : "Collapse", action: () => this.toggleCollapse(id) },
        { label: "Duplicate", shortcut: "Ctrl+D", action: () => this.app.duplicate() },
        { label: "Copy", shortcut: "Ctrl+C", action: () => this.app.copy() },
        { label: "Help", action: () => this.app.showHelp(node.type) },
        { element: swatches },
        { label: this.selection.size > 1 ? `Delete ${this.selection.size} nodes` : "Delete", shortcut: "Del",
          danger: true, action: () => this.deleteSelection() },
      ]);
      return;
    }
    if (t.classList.contains("ng-link-hit")) {
      this.selectLink(t.dataset.to, t.dataset.input);
      this.app.menu(e.clientX, e.clientY, [{ label: "Remove link", danger: true, action: () => this.deleteSelectedLink() }]);
      return;
    }
    this.app.menu(e.clientX, e.clientY, [
      { label: "Add node…", action: () => this.app.quickAdd(e.clientX, e.clientY, null, (type) => this.addNode(type, [wx, wy])) },
      { label: "Paste", shortcut: "Ctrl+V", action: () => this.app.paste() },
      { label: "Select all", shortcut: "Ctrl+A", action: () => this.selectAll() },
      { label: "Fit view", shortcut: ".", action: () => this.fitView() },
    ]);
  }
}

