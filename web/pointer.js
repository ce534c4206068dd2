// Pointer interaction on the canvas: one gesture at a time (pan, move nodes, resize, box select, drag a link),
// started by a press, followed on the window and finished by the release; the wheel zooms; a double click adds a
// node or renames one; a right click opens the node, link or canvas menu. Every change goes through the Canvas's
// editing operations and ends in one commit, so a gesture is one undo step.

import { inputAccepts } from "./graph.js";
import { curve, typeColor } from "./nodeview.js";
import { h } from "./widgets.js";

const DRAG_THRESHOLD = 4;
const SWATCHES = ["#3a4a6b", "#3b5e46", "#6b3a3a", "#6b5a2e", "#4f3b6b", "#2e5f66", "#555b66"];

export class Pointer {
  constructor(canvas) {
    this.canvas = canvas;
    this.drag = null; // the gesture in progress
    const root = canvas.root;
    root.addEventListener("pointerdown", (e) => this._onPointerDown(e));
    // moves and releases are followed on the window (not by pointer capture, which would retarget the clicks and
    // double-clicks that follow a press to the canvas itself)
    window.addEventListener("pointermove", (e) => this._onPointerMove(e));
    window.addEventListener("pointerup", (e) => this._onPointerUp(e));
    window.addEventListener("pointercancel", (e) => this._onPointerUp(e, true));
    root.addEventListener("wheel", (e) => this._onWheel(e), { passive: false });
    root.addEventListener("dblclick", (e) => this._onDoubleClick(e));
    root.addEventListener("contextmenu", (e) => this._onContextMenu(e));
  }

  get graph() {
    return this.canvas.graph;
  }

  _track(e) {
    const [x, y] = this.canvas.screenToWorld(e.clientX, e.clientY);
    this.canvas.pointer = { x, y, inside: true };
  }

  _onPointerDown(e) {
    const canvas = this.canvas;
    canvas.hooks.closePopups(e.target);
    this._track(e);
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
        if (!canvas.selection.has(nodeEl.dataset.id) && !e.shiftKey) canvas.setSelection([nodeEl.dataset.id]);
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
      canvas.selectLink(t.dataset.to, t.dataset.input);
      return;
    }
    // the background
    e.preventDefault();
    this._blurEditing();
    canvas.root.focus({ preventScroll: true });
    if (e.shiftKey || e.ctrlKey || e.metaKey) this._startBox(e);
    else this._startPan(e, true);
  }

  /** A field being edited reports its value on blur: end the edit before a gesture changes the graph. */
  _blurEditing() {
    const root = this.canvas.root;
    const active = document.activeElement;
    if (active && active !== root && root.contains(active)) active.blur();
    if (document.activeElement === document.body || !document.activeElement) root.focus({ preventScroll: true });
  }

  _startPan(e, clickClears = false) {
    const view = this.canvas.view;
    this.drag = { kind: "pan", sx: e.clientX, sy: e.clientY, vx: view.x, vy: view.y, moved: false, clickClears };
    this.canvas.root.classList.add("panning");
  }

  _startBox(e) {
    const rect = this.canvas.root.getBoundingClientRect();
    this.drag = { kind: "box", sx: e.clientX, sy: e.clientY, rect, additive: true, base: new Set(this.canvas.selection),
      moved: false };
  }

  _startNodeDrag(e, id) {
    const canvas = this.canvas;
    const additive = e.shiftKey || e.ctrlKey || e.metaKey;
    let toggledOff = false;
    if (additive) {
      const next = new Set(canvas.selection);
      if (next.has(id)) {
        next.delete(id);
        toggledOff = true;
      } else next.add(id);
      canvas.setSelection(next);
    } else if (!canvas.selection.has(id)) {
      canvas.setSelection([id]);
    }
    if (toggledOff) return;
    const start = new Map();
    for (const sid of canvas.selection) start.set(sid, [...this.graph.node(sid).pos]);
    this.drag = { kind: "node", id, sx: e.clientX, sy: e.clientY, start, moved: false, additive };
  }

  _startResize(e, id) {
    const view = this.canvas.views.get(id);
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
      const link = this.graph.node(id).link(name);
      if (link) {
        // pick the link up: it now hangs from its source
        this.graph.disconnect(id, name);
        this.canvas.renderNode(id);
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
    this.canvas.root.classList.add("linking");
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
    for (const socket of this.canvas.nodesLayer.querySelectorAll(".ng-socket")) {
      const ok = this._compatible(drag, socket);
      socket.classList.toggle("compatible", ok);
      socket.closest(".ng-slot, .ng-widget-row")?.classList.toggle("compatible", ok);
    }
  }

  _clearCompatible() {
    this.canvas.root.classList.remove("linking");
    for (const el of this.canvas.nodesLayer.querySelectorAll(".compatible, .hover-ok, .hover-bad")) {
      el.classList.remove("compatible", "hover-ok", "hover-bad");
    }
  }

  _drawDragLink(e) {
    const d = this.drag;
    const { root, view, dragPath, nodesLayer } = this.canvas;
    const rect = root.getBoundingClientRect();
    const toScreen = ([x, y]) => [x * view.scale + view.x, y * view.scale + view.y];
    const mouse = [e.clientX - rect.left, e.clientY - rect.top];
    const [a, b] = d.reverse
      ? [mouse, toScreen(this.canvas.socketPos(d.to, "in", d.input))]
      : [toScreen(this.canvas.socketPos(d.from, "out", d.output)), mouse];
    dragPath.setAttribute("d", curve(a, b));
    dragPath.style.stroke = typeColor(d.reverse ? d.accepts[0] : d.type);
    dragPath.style.display = "";
    for (const el of nodesLayer.querySelectorAll(".hover-ok, .hover-bad")) el.classList.remove("hover-ok", "hover-bad");
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
    const canvas = this.canvas;
    if (canvas.root.contains(e.target)) this._track(e);
    else if (!this.drag) canvas.pointer.inside = false;
    const d = this.drag;
    if (!d) return;
    const dx = e.clientX - d.sx;
    const dy = e.clientY - d.sy;
    if (!d.moved && Math.hypot(dx, dy) >= DRAG_THRESHOLD) d.moved = true;
    const s = canvas.view.scale;
    if (d.kind === "pan") {
      if (!d.moved) return;
      canvas.view.x = d.vx + dx;
      canvas.view.y = d.vy + dy;
      canvas.applyView();
    } else if (d.kind === "node") {
      if (!d.moved) return;
      for (const [id, [x, y]] of d.start) {
        const node = this.graph.node(id);
        node.pos = [x + dx / s, y + dy / s];
        const view = canvas.views.get(id);
        if (view) {
          view.el.style.left = `${node.pos[0]}px`;
          view.el.style.top = `${node.pos[1]}px`;
        }
      }
      canvas.scheduleLinks();
    } else if (d.kind === "resize") {
      const node = this.graph.node(d.id);
      const view = canvas.views.get(d.id);
      const w = Math.max(140, Math.round(d.w + dx / s));
      view.el.style.width = `${w}px`;
      const natural = view.el.scrollHeight;
      const hh = Math.max(40, Math.round(d.h + dy / s));
      node.ui.size = [w, Math.max(hh, 0)];
      view.el.style.minHeight = `${hh}px`;
      // never smaller than the content: the node grows back instead of clipping its widgets
      if (natural > hh) view.el.style.minHeight = "";
      view.dirty = true;
      canvas.scheduleLinks();
    } else if (d.kind === "box") {
      if (!d.moved) return;
      this._boxSelect(d, e);
    } else if (d.kind === "link") {
      this._drawDragLink(e);
    }
  }

  _boxSelect(d, e) {
    const canvas = this.canvas;
    const x0 = Math.min(d.sx, e.clientX) - d.rect.left;
    const y0 = Math.min(d.sy, e.clientY) - d.rect.top;
    Object.assign(canvas.box.style, { left: `${x0}px`, top: `${y0}px`, width: `${Math.abs(e.clientX - d.sx)}px`,
      height: `${Math.abs(e.clientY - d.sy)}px` });
    canvas.box.hidden = false;
    const [ax, ay] = canvas.screenToWorld(Math.min(d.sx, e.clientX), Math.min(d.sy, e.clientY));
    const [bx, by] = canvas.screenToWorld(Math.max(d.sx, e.clientX), Math.max(d.sy, e.clientY));
    const picked = new Set(d.base);
    for (const [id, view] of canvas.views) {
      const [x, y] = this.graph.node(id).pos;
      const w = view.el.offsetWidth;
      const hh = view.el.offsetHeight;
      if (x < bx && x + w > ax && y < by && y + hh > ay) picked.add(id);
    }
    canvas.setSelection(picked);
  }

  _onPointerUp(e, cancelled = false) {
    const canvas = this.canvas;
    const d = this.drag;
    if (!d) return;
    this.drag = null;
    canvas.root.classList.remove("panning");
    if (d.kind === "pan") {
      if (!d.moved && d.clickClears) {
        canvas.setSelection([]);
        canvas.selectLink(null);
      }
      canvas.hooks.saveView();
    } else if (d.kind === "node") {
      if (d.moved) canvas.hooks.commit();
      else if (!d.additive) canvas.setSelection([d.id]);
    } else if (d.kind === "resize") {
      if (d.moved) canvas.hooks.commit();
    } else if (d.kind === "box") {
      canvas.box.hidden = true;
    } else if (d.kind === "link") {
      canvas.dragPath.style.display = "none";
      this._clearCompatible();
      if (!cancelled) this._dropLink(d, e);
    }
  }

  _dropLink(d, e) {
    const canvas = this.canvas;
    const graph = this.graph;
    const { commit, notify } = canvas.hooks;
    const socket = this._dropSocket(e.clientX, e.clientY, d);
    if (socket) {
      const id = socket.dataset.node;
      const name = socket.dataset.name;
      const dir = socket.dataset.dir;
      if (!d.reverse && dir === "in") {
        const result = graph.connect(d.from, d.output, id, name);
        if (result.ok) {
          canvas.renderNode(id);
          commit();
        } else {
          notify(`Cannot connect ${d.output} (${d.type}) to ${name}: ${result.reason}`, "error");
          if (d.detached) this._restoreDetached(d);
        }
        return;
      }
      if (d.reverse && dir === "out") {
        const result = graph.connect(id, name, d.to, d.input);
        if (result.ok) {
          canvas.renderNode(d.to);
          commit();
        } else {
          notify(`Cannot connect ${name} to ${d.input}: ${result.reason}`, "error");
        }
        return;
      }
      if (d.detached) this._restoreDetached(d);
      return;
    }
    // onto a node but not a socket: the first compatible input (free ones first)
    const nodeEl = document.elementFromPoint(e.clientX, e.clientY)?.closest(".ng-node");
    if (nodeEl && !d.reverse) {
      const id = nodeEl.dataset.id;
      const candidates = graph.inputSpecs(id).filter((s) => graph.canConnect(d.from, d.output, id, s.name).ok);
      const node = graph.node(id);
      const pick = candidates.find((s) => s.kind === "socket" && !node.link(s.name))
        || candidates.find((s) => !node.link(s.name)) || candidates[0];
      if (pick) {
        graph.connect(d.from, d.output, id, pick.name);
        canvas.renderNode(id);
        commit();
      } else {
        notify(`${canvas.titleOf(id)} has no input that accepts ${d.type}`, "error");
        if (d.detached) commit();
      }
      return;
    }
    if (nodeEl && d.reverse) {
      const id = nodeEl.dataset.id;
      const pick = graph.outputSpecs(id).find((o) => graph.canConnect(id, o.name, d.to, d.input).ok);
      if (pick) {
        graph.connect(id, pick.name, d.to, d.input);
        canvas.renderNode(d.to);
        commit();
      } else {
        notify(`${canvas.titleOf(id)} has no output that ${d.input} accepts`, "error");
      }
      return;
    }
    // empty space: a detached link is dropped; otherwise offer the nodes that fit
    if (d.detached) {
      commit();
      return;
    }
    const [wx, wy] = canvas.screenToWorld(e.clientX, e.clientY);
    const filter = d.reverse ? { output: d.accepts } : { input: d.type };
    canvas.hooks.quickAdd(e.clientX, e.clientY, filter, (type) => {
      const spot = d.reverse ? [wx - 260, wy - 20] : [wx + 10, wy - 20];
      const id = canvas.addNode(type, spot, { commit: false });
      if (d.reverse) {
        const out = graph.outputSpecs(id).find((o) => graph.canConnect(id, o.name, d.to, d.input).ok);
        if (out) graph.connect(id, out.name, d.to, d.input);
        canvas.renderNode(d.to);
      } else {
        const spec = graph.inputSpecs(id).find((s) => graph.canConnect(d.from, d.output, id, s.name).ok);
        if (spec) graph.connect(d.from, d.output, id, spec.name);
        canvas.renderNode(id);
      }
      commit();
    });
  }

  _restoreDetached(d) {
    const { to, input } = d.detached;
    this.graph.connect(d.from, d.output, to, input);
    this.canvas.renderNode(to);
  }

  _onWheel(e) {
    const t = e.target;
    if (t.closest?.(".ng-popup")) return;
    // a scrollable field scrolls; Ctrl+wheel zooms anyway
    const scroller = t.closest?.("textarea, select, .w-list");
    if (scroller && scroller.scrollHeight > scroller.clientHeight + 1 && !e.ctrlKey) return;
    e.preventDefault();
    const delta = e.deltaMode === 1 ? e.deltaY * 16 : e.deltaY;
    this.canvas.zoomAt(e.clientX, e.clientY, Math.exp(-delta * 0.0015));
    this.canvas.hooks.saveView();
  }

  _onDoubleClick(e) {
    const canvas = this.canvas;
    const t = e.target;
    const title = t.closest(".ng-title-text, .ng-id");
    if (title) {
      canvas.rename(title.closest(".ng-node").dataset.id);
      return;
    }
    if (t.closest(".ng-node") || t.closest(".ng-link-hit")) return;
    const [wx, wy] = canvas.screenToWorld(e.clientX, e.clientY);
    canvas.hooks.quickAdd(e.clientX, e.clientY, null, (type) => canvas.addNode(type, [wx, wy]));
  }

  _onContextMenu(e) {
    const canvas = this.canvas;
    const hooks = canvas.hooks;
    const t = e.target;
    if (t.closest("input, textarea")) return;
    e.preventDefault();
    this._track(e);
    const nodeEl = t.closest(".ng-node");
    if (nodeEl) {
      this._nodeMenu(e, nodeEl.dataset.id);
      return;
    }
    if (t.classList.contains("ng-link-hit")) {
      canvas.selectLink(t.dataset.to, t.dataset.input);
      hooks.menu(e.clientX, e.clientY, [{ label: "Remove link", danger: true, action: () => canvas.deleteSelectedLink() }]);
      return;
    }
    const [wx, wy] = canvas.screenToWorld(e.clientX, e.clientY);
    hooks.menu(e.clientX, e.clientY, [
      { label: "Add node…",
        action: () => hooks.quickAdd(e.clientX, e.clientY, null, (type) => canvas.addNode(type, [wx, wy])) },
      { label: "Paste", shortcut: "Ctrl+V", action: () => hooks.paste() },
      { label: "Select all", shortcut: "Ctrl+A", action: () => canvas.selectAll() },
      { label: "Fit view", shortcut: ".", action: () => canvas.fitView() },
    ]);
  }

  _nodeMenu(e, id) {
    const canvas = this.canvas;
    const hooks = canvas.hooks;
    if (!canvas.selection.has(id)) canvas.setSelection([id]);
    const node = this.graph.node(id);
    const swatches = h("div", { class: "ng-swatches" });
    for (const color of [null, ...SWATCHES]) {
      const sw = h("button", { type: "button", class: "ng-swatch", title: color || "default" });
      sw.style.background = color || "var(--node-title)";
      sw.addEventListener("click", () => {
        canvas.setColor(id, color);
        hooks.closePopups();
      });
      swatches.append(sw);
    }
    const count = canvas.selection.size;
    hooks.menu(e.clientX, e.clientY, [
      { label: "Rename", action: () => canvas.rename(id) },
      { label: node.ui.collapsed ? "Expand" : "Collapse", action: () => canvas.toggleCollapse(id) },
      { label: "Duplicate", shortcut: "Ctrl+D", action: () => hooks.duplicate() },
      { label: "Copy", shortcut: "Ctrl+C", action: () => hooks.copy() },
      { label: "Help", action: () => hooks.showHelp(node.type) },
      { element: swatches },
      { label: count > 1 ? `Delete ${count} nodes` : "Delete", shortcut: "Del", danger: true,
        action: () => canvas.deleteSelection() },
    ]);
  }
}
