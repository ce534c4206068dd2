// Node views: each node is a DOM element (title bar, socket rows, widget rows, output and error areas) placed in
// world units on the canvas's node layer; links are SVG curves between socket centres measured from those
// elements; groups and notes from a workflow are drawn under the nodes. A node's element is rebuilt whole when
// its node changes shape (linked, collapsed, renamed): nodes are small, and one way of building them keeps the
// DOM from drifting away from the graph.

import { inputAccepts, isLink } from "./graph.js";
import { createWidget, h } from "./widgets.js";

const SVG = "http://www.w3.org/2000/svg";

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

/** The SVG path of a link from a to b (screen or world points): leaves and enters its sockets horizontally. */
export function curve(a, b) {
  const d = Math.max(40, Math.abs(b[0] - a[0]) * 0.5);
  return `M ${a[0]} ${a[1]} C ${a[0] + d} ${a[1]}, ${b[0] - d} ${b[1]}, ${b[0]} ${b[1]}`;
}

function inputTitle(spec) {
  const accepts = inputAccepts(spec).join(" or ");
  return [`${spec.name}${spec.optional ? " (optional)" : ""}`, spec.tooltip, `a link may carry ${accepts}`]
    .filter(Boolean).join("\n");
}

function socketDot(id, dir, name, type) {
  const dot = h("span", { class: `ng-socket ${dir}`, "data-node": id, "data-dir": dir, "data-name": name,
    "data-type": type || "*" });
  dot.style.setProperty("--socket-color", typeColor(type));
  return dot;
}

export class NodeViews {
  /** canvas: the Canvas these views belong to (its graph, layers, zoom, selection and run state). */
  constructor(canvas) {
    this.canvas = canvas;
    this.views = new Map();
    // socket positions are cached per node: a node that changes size must measure them again
    this.resizeObserver = new ResizeObserver((entries) => {
      for (const entry of entries) {
        const view = this.views.get(entry.target.dataset.id);
        if (view) view.dirty = true;
      }
      canvas.scheduleLinks();
    });
  }

  get graph() {
    return this.canvas.graph;
  }

  clear() {
    for (const view of this.views.values()) this.resizeObserver.unobserve(view.el);
    this.views.clear();
    this.canvas.nodesLayer.replaceChildren();
  }

  /** Build the element of a node again, in place; a node gone from the graph loses its element. */
  rebuild(id) {
    const old = this.views.get(id);
    const node = this.graph.node(id);
    if (old) {
      this.resizeObserver.unobserve(old.el);
      if (!node) {
        old.el.remove();
        this.views.delete(id);
      }
    }
    if (node) this.mount(id, old?.el);
  }

  mount(id, replace = null) {
    const canvas = this.canvas;
    const node = this.graph.node(id);
    const def = this.graph.def(id);
    const el = h("div", { class: "ng-node", "data-id": id, "data-type": node.type });
    if (!def) el.classList.add("unknown");
    if (def?.output_node) el.classList.add("output-node");
    if (!this.graph.inputSpecs(id).some((s) => s.kind !== "socket")) el.classList.add("narrow");
    if (node.ui.collapsed) el.classList.add("collapsed");
    if (canvas.selection.has(id)) el.classList.add("selected");
    const view = { el, sockets: { in: new Map(), out: new Map() }, rows: new Map(), widgets: new Map(), offsets: null,
      dirty: true };

    const titleText = h("span", { class: "ng-title-text", text: canvas.titleOf(id) });
    const toggle = h("button", { class: "ng-collapse", type: "button", title: "collapse / expand",
      text: node.ui.collapsed ? "▸" : "▾" });
    toggle.addEventListener("click", (e) => {
      e.stopPropagation();
      canvas.toggleCollapse(id);
    });
    const badge = h("span", { class: "ng-badge" });
    const progress = h("div", { class: "ng-progress" }, h("div", { class: "ng-progress-bar" }));
    const title = h("div", { class: "ng-title", title: def ? (def.description || def.name) : `unknown node type ${node.type}` },
      toggle, titleText, h("span", { class: "ng-id", text: `#${id}` }), badge, progress);
    if (safeColor(node.ui.color)) title.style.background = safeColor(node.ui.color);
    el.append(title);
    Object.assign(view, { title, titleText, badge, progress });

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
        const dot = socketDot(id, "in", spec.name, spec.type);
        const slot = h("div", { class: "ng-slot in", "data-input": spec.name, title: inputTitle(spec) }, dot,
          h("span", { class: "ng-slot-label", text: spec.name + (spec.optional ? "?" : "") }));
        view.sockets.in.set(spec.name, dot);
        view.rows.set(spec.name, slot);
        row.append(slot);
      } else {
        row.append(h("div", { class: "ng-slot in empty" }));
      }
      const out = outputs[i];
      if (out) {
        const dot = socketDot(id, "out", out.name, out.type);
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

    this.place(el, node);
    if (replace && replace.parentNode) replace.replaceWith(el);
    else canvas.nodesLayer.append(el);
    this.views.set(id, view);
    this.resizeObserver.observe(el);
    canvas.run.apply(id);
    return view;
  }

  place(el, node) {
    const [x, y] = node.pos;
    el.style.left = `${x}px`;
    el.style.top = `${y}px`;
    const size = Array.isArray(node.ui.size) ? node.ui.size : null;
    el.style.width = size && size[0] ? `${size[0]}px` : "";
    el.style.minHeight = size && size[1] && !node.ui.collapsed ? `${size[1]}px` : "";
  }

  _widgetRow(id, spec, view) {
    const node = this.graph.node(id);
    const link = node.link(spec.name);
    const accepts = inputAccepts(spec);
    const row = h("div", { class: "ng-widget-row", "data-input": spec.name, title: inputTitle(spec) });
    const known = spec.kind !== "unknown";
    const dot = socketDot(id, "in", spec.name, accepts[0]);
    dot.classList.add("widget-socket");
    if (known) view.sockets.in.set(spec.name, dot);
    const label = h("span", { class: "ng-widget-label", text: spec.name + (spec.optional ? "?" : "") });
    const control = h("div", { class: "ng-widget-control" });
    if (link) {
      row.classList.add("linked");
      const source = this.graph.node(link[0]);
      control.append(h("span", { class: "ng-linked",
        text: `← ${source ? this.canvas.titleOf(link[0]) : link[0]}.${link[1]}` }));
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
    const canvas = this.canvas;
    const graph = this.graph;
    return {
      api: canvas.api,
      notify: (msg, kind) => canvas.hooks.notify(msg, kind),
      onInput: (value) => {
        graph.setValue(id, name, value);
        canvas.hooks.touch();
      },
      onChange: (value) => {
        graph.setValue(id, name, value);
        canvas.run.clearInputError(id, name);
        canvas.hooks.commit();
      },
      onResize: () => canvas.scheduleLinks(),
      seed: {
        get: () => !!graph.node(id)?.ui.random_seed,
        set: (on) => {
          const node = graph.node(id);
          if (!node) return;
          if (on) node.ui.random_seed = true;
          else delete node.ui.random_seed;
          canvas.hooks.commit();
        },
      },
    };
  }

  /** Show the graph's values in a node's widgets again (after a seed is randomised, say). */
  refreshWidgets(id) {
    const view = this.views.get(id);
    const node = this.graph.node(id);
    if (!view || !node) return;
    for (const [name, widget] of view.widgets) widget.set(node.inputs[name]);
  }

  renderDecor() {
    const decor = this.canvas.decor;
    decor.replaceChildren();
    for (const group of this.graph.groups || []) {
      if (!group || !Array.isArray(group.bounding)) continue;
      const [x, y, w, hh] = group.bounding;
      const el = h("div", { class: "ng-group" }, h("div", { class: "ng-group-title", text: group.title || "" }));
      Object.assign(el.style, { left: `${x}px`, top: `${y}px`, width: `${w}px`, height: `${hh}px` });
      if (safeColor(group.color)) el.style.setProperty("--group-color", safeColor(group.color));
      decor.append(el);
    }
    for (const note of this.graph.notes || []) {
      if (!note) continue;
      const [x, y] = Array.isArray(note.pos) ? note.pos : [0, 0];
      const el = h("div", { class: "ng-note", text: String(note.text ?? "") });
      Object.assign(el.style, { left: `${x}px`, top: `${y}px` });
      if (Array.isArray(note.size)) el.style.width = `${note.size[0]}px`;
      decor.append(el);
    }
  }

  // --- sockets and links ----------------------------------------------------------------------------------------
  /** Socket centres relative to the node, in world units; measured once per layout change, not per frame. */
  _offsets(id) {
    const view = this.views.get(id);
    if (!view) return null;
    if (view.dirty || !view.offsets) {
      const scale = this.canvas.view.scale;
      const rect = view.el.getBoundingClientRect();
      const titleH = view.title.offsetHeight || 24;
      const width = view.el.offsetWidth;
      const offsets = { in: new Map(), out: new Map() };
      for (const dir of ["in", "out"]) {
        for (const [name, dot] of view.sockets[dir]) {
          const r = dot.getBoundingClientRect();
          if (r.width === 0 && r.height === 0) {
            // hidden (a collapsed node): links meet the title bar
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

  drawLinks() {
    const canvas = this.canvas;
    const group = canvas.linkGroup;
    group.replaceChildren();
    let selectedMid = null;
    const chosen = canvas.selectedLink;
    for (const link of this.graph.links()) {
      const a = this.socketPos(link.from, "out", link.output);
      const b = this.socketPos(link.to, "in", link.input);
      if (!a || !b) continue;
      const d = curve(a, b);
      const selected = chosen && chosen.to === link.to && chosen.input === link.input;
      const path = document.createElementNS(SVG, "path");
      path.setAttribute("d", d);
      path.classList.add("ng-link");
      if (selected) path.classList.add("selected");
      if (canvas.selection.has(link.from) || canvas.selection.has(link.to)) path.classList.add("active");
      path.style.stroke = typeColor(link.type);
      // a wide transparent twin takes the clicks: the visible curve is too thin to hit
      const hit = document.createElementNS(SVG, "path");
      hit.setAttribute("d", d);
      hit.classList.add("ng-link-hit");
      Object.assign(hit.dataset, { to: link.to, input: link.input, from: link.from, output: link.output });
      group.append(path, hit);
      if (selected) {
        const dd = Math.max(40, Math.abs(b[0] - a[0]) * 0.5);
        selectedMid = [(a[0] + 3 * (a[0] + dd) + 3 * (b[0] - dd) + b[0]) / 8, (a[1] * 4 + b[1] * 4) / 8];
      }
    }
    const remove = canvas.linkDelete;
    if (selectedMid) {
      remove.hidden = false;
      remove.style.left = `${selectedMid[0]}px`;
      remove.style.top = `${selectedMid[1]}px`;
    } else {
      remove.hidden = true;
      if (chosen) canvas.selectedLink = null; // its link is gone
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
}
