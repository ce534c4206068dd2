// The canvas: nodes as DOM elements on a pannable, zoomable world; links as SVG curves under them. This class
// keeps the view (pan and zoom), the selection and the editing operations; the rest is delegated:
//
//   nodeview.js  building a node's element (title, sockets, widget rows) and drawing the links
//   pointer.js   mouse gestures, the wheel, double clicks and the context menus
//   runstate.js  what the server says about each node while a workflow runs
//
// The canvas does not know the App: whatever it needs from the page (commit an edit to the history, show a menu
// or a toast, open the quick-add popup, the clipboard) is handed to the constructor as callbacks.

import { NodeViews, safeColor, typeColor } from "./nodeview.js";
import { Pointer } from "./pointer.js";
import { RunState } from "./runstate.js";
import { h } from "./widgets.js";

const MIN_SCALE = 0.1;
const MAX_SCALE = 3;

/** The callbacks a Canvas takes; any left out does nothing. */
export const CANVAS_HOOKS = [
  "commit", // an edit is finished: record a history step
  "touch", // a value changed while typing: autosave soon, no history step
  "saveView", // the view moved: remember it
  "notify", // (message, kind) a toast
  "menu", // (x, y, items) a popup menu at a screen point
  "quickAdd", // (x, y, filter, onPick(type)) the node search popup
  "closePopups", // (target?) close menus and popups, unless target is inside one
  "showImage", // (url, image) enlarge an output image
  "showHelp", // (type) the help of a node type
  "duplicate", "copy", "paste", // the clipboard operations of the node and canvas menus
  "onViewChange", // after every pan or zoom
  "onSelectionChange", // after the selected nodes changed
];

export function isTextEntry(el) {
  return !!el && (el.tagName === "TEXTAREA" || el.tagName === "SELECT" || el.isContentEditable
    || (el.tagName === "INPUT" && !["checkbox", "button", "file", "radio"].includes(el.type)));
}

/** End the edit of a text field: it reports its value on blur (before a run is queued or a file saved, say). */
export function blurTextEntry() {
  const active = document.activeElement;
  if (active && active !== document.body && isTextEntry(active)) active.blur();
}

export { safeColor, typeColor };

function svg(cls) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  el.classList.add(cls);
  return el;
}

export class Canvas {
  /**
   * root: the element to draw in. graph: the Graph shown (the same object for the canvas's life; loading a
   * workflow refills it). api: the server client (image URLs, uploads). The rest are the CANVAS_HOOKS callbacks.
   */
  constructor(root, { graph, api, ...hooks }) {
    const unknown = Object.keys(hooks).filter((name) => !CANVAS_HOOKS.includes(name));
    if (unknown.length) throw new Error(`unknown canvas callbacks: ${unknown.join(", ")}`);
    this.root = root;
    this.graph = graph;
    this.api = api;
    this.hooks = Object.fromEntries(CANVAS_HOOKS.map((name) => [name, hooks[name] || (() => {})]));
    this.view = { x: 0, y: 0, scale: 1 };
    this.selection = new Set();
    this.selectedLink = null;
    this.pointer = { x: 0, y: 0 }; // the last pointer position, in world units (pastes land there)
    this._linksQueued = false;

    root.classList.add("ng-canvas");
    root.tabIndex = 0;
    this.linkSvg = svg("ng-links");
    this.linkGroup = document.createElementNS("http://www.w3.org/2000/svg", "g");
    this.linkSvg.append(this.linkGroup);
    this.world = h("div", { class: "ng-world" });
    this.decor = h("div", { class: "ng-decor" });
    this.nodesLayer = h("div", { class: "ng-nodes" });
    this.linkDelete = h("button", { class: "ng-link-delete", type: "button", title: "remove this link", text: "×",
      hidden: true });
    this.world.append(this.decor, this.nodesLayer, this.linkDelete);
    this.overlay = svg("ng-overlay");
    this.dragPath = document.createElementNS("http://www.w3.org/2000/svg", "path");
    this.dragPath.classList.add("ng-drag-link");
    this.overlay.append(this.dragPath);
    this.box = h("div", { class: "ng-select-box", hidden: true });
    this.emptyHint = h("div", { class: "ng-empty-hint" },
      h("div", { class: "big", text: "Empty canvas" }),
      h("div", { text: "Add nodes from the palette, double-click here to search, or drop a workflow .json or a "
        + "generated PNG." }));
    root.append(this.linkSvg, this.world, this.overlay, this.box, this.emptyHint);

    this.nodeViews = new NodeViews(this);
    this.views = this.nodeViews.views;
    this.run = new RunState({ graph, views: this.views, viewUrl: (image) => api.viewUrl(image),
      showImage: (url, image) => this.hooks.showImage(url, image), relayout: () => this.scheduleLinks() });
    this.gestures = new Pointer(this);
    this.linkDelete.addEventListener("click", () => this.deleteSelectedLink());
    window.addEventListener("resize", () => this.scheduleLinks());
    this.applyView();
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
    this.hooks.onViewChange();
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
    this.nodeViews.clear();
    for (const id of [...this.selection]) if (!this.graph.node(id)) this.selection.delete(id);
    if (this.selectedLink && !this.graph.node(this.selectedLink.to)) this.selectedLink = null;
    for (const node of this.graph.nodes.values()) this.nodeViews.mount(node.id);
    this.nodeViews.renderDecor();
    this.emptyHint.hidden = this.graph.nodes.size > 0;
    this.scheduleLinks();
  }

  /** Build (or rebuild, or remove) one node's element. */
  renderNode(id) {
    this.nodeViews.rebuild(id);
    this.emptyHint.hidden = this.graph.nodes.size > 0;
    this.scheduleLinks();
  }

  refreshWidgets(id) {
    this.nodeViews.refreshWidgets(id);
  }

  titleOf(id) {
    const node = this.graph.node(id);
    if (!node) return String(id);
    const def = this.graph.defs.get(node.type);
    return node.ui.title || def?.display_name || node.type;
  }

  /** Links are drawn once per frame however many changes ask for it. */
  scheduleLinks() {
    if (this._linksQueued) return;
    this._linksQueued = true;
    requestAnimationFrame(() => {
      this._linksQueued = false;
      this.nodeViews.drawLinks();
    });
  }

  socketPos(id, dir, name) {
    return this.nodeViews.socketPos(id, dir, name);
  }

  // --- selection ------------------------------------------------------------------------------------------------
  setSelection(ids) {
    this.selection = new Set([...ids].map(String).filter((id) => this.graph.node(id)));
    for (const [id, view] of this.views) view.el.classList.toggle("selected", this.selection.has(id));
    if (this.selection.size) this.selectedLink = null;
    this.scheduleLinks();
    this.hooks.onSelectionChange();
  }

  selectAll() {
    this.setSelection(this.graph.nodes.keys());
  }

  selectLink(to, input) {
    this.selectedLink = to === null ? null : { to, input };
    if (to !== null) this.setSelection([]);
    this.scheduleLinks();
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
    if (commit) this.hooks.commit();
    return node.id;
  }

  deleteSelectedLink() {
    if (!this.selectedLink) return false;
    const { to, input } = this.selectedLink;
    this.selectedLink = null;
    if (this.graph.disconnect(to, input)) {
      this.renderNode(to);
      this.hooks.commit();
    }
    return true;
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
      this.run.forget(id);
    }
    this.selection.clear();
    for (const id of ids) this.renderNode(id);
    for (const id of affected) if (this.graph.node(id)) this.renderNode(id);
    this.hooks.onSelectionChange();
    this.hooks.commit();
    return true;
  }

  /** Add a clipboard fragment at `at` (world units), else at the pointer when it is over the canvas. */
  paste(fragment, { keepExternal = false, at = null } = {}) {
    if (!fragment || !fragment.nodes || !Object.keys(fragment.nodes).length) return [];
    const target = at || (this.pointer.inside ? [this.pointer.x, this.pointer.y] : this.worldCenter());
    const ids = this.graph.paste(fragment, target, { keepExternal });
    for (const id of ids) this.renderNode(id);
    this.setSelection(ids);
    this.hooks.commit();
    return ids;
  }

  toggleCollapse(id) {
    const node = this.graph.node(id);
    if (!node) return;
    if (node.ui.collapsed) delete node.ui.collapsed;
    else node.ui.collapsed = true;
    this.renderNode(id);
    this.hooks.commit();
  }

  setColor(id, color) {
    const node = this.graph.node(id);
    if (!node) return;
    if (color) node.ui.color = color;
    else delete node.ui.color;
    this.renderNode(id);
    this.hooks.commit();
  }

  /** Edit a node's title in place; Enter or leaving the field keeps it, Escape does not. */
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
      // linked widgets name their source by its title
      for (const link of this.graph.links()) if (link.from === id) this.renderNode(link.to);
      if (save) this.hooks.commit();
    };
    input.addEventListener("keydown", (e) => {
      e.stopPropagation();
      if (e.key === "Enter") finish(true);
      if (e.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true));
  }
}
