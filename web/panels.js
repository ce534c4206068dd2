// What the App shows around the canvas: the side panel (the selection, a node type's help, the gallery of
// generated images), the lightbox, popup menus and toasts.

import { inputAccepts } from "./graph.js";
import { h } from "./widgets.js";

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

function shortcutTable() {
  const list = h("dl", { class: "shortcuts" });
  for (const [keys, what] of SHORTCUTS) list.append(h("dt", {}, h("kbd", { text: keys })), h("dd", { text: what }));
  return list;
}

export class Panels {
  /** canvas: its selection and node titles are shown; quick: the quick-add popup; workflowName() names the
   * workflow when nothing is selected. */
  constructor({ graph, canvas, quick, workflowName }) {
    Object.assign(this, { graph, canvas, quick, workflowName });
    this.gallery = [];
    this._menu = null;
    for (const button of document.querySelectorAll(".side-tabs button")) {
      button.addEventListener("click", () => this.selectTab(button.dataset.tab));
    }
    const lightbox = $("#lightbox");
    lightbox.addEventListener("click", (e) => {
      if (e.target.tagName !== "A") lightbox.hidden = true;
    });
    this.renderGallery();
  }

  // --- toasts and popups ----------------------------------------------------------------------------------------
  notify(message, kind = "info") {
    const toast = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status", text: message });
    $("#toasts").append(toast);
    const ttl = kind === "error" ? 7000 : 2500;
    setTimeout(() => toast.classList.add("leaving"), ttl);
    setTimeout(() => toast.remove(), ttl + 400);
    toast.addEventListener("click", () => toast.remove());
  }

  /** items: {label, shortcut?, danger?, action} or {element} (shown as it is). */
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

  /** Close the menu and the quick-add popup, unless `target` (a click's) is inside one. */
  closePopups(target = null) {
    if (target && target.closest?.(".ng-popup")) return;
    if (this._menu) {
      this._menu.remove();
      this._menu = null;
    }
    if (this.quick.isOpen) this.quick.close();
  }

  // --- side panel -----------------------------------------------------------------------------------------------
  selectTab(name) {
    for (const button of document.querySelectorAll(".side-tabs button")) {
      button.classList.toggle("active", button.dataset.tab === name);
    }
    $("#panel-info").hidden = name !== "info";
    $("#panel-gallery").hidden = name !== "gallery";
  }

  /** The info tab follows the selection: one node's help, a count, or the workflow and the shortcuts. */
  showSelection() {
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
    panel.append(h("h3", { text: this.workflowName() || "untitled workflow" }),
      h("p", { class: "muted", text: `${this.graph.nodes.size} node(s), ${links} link(s). Select a node to see its `
        + "help; hover a palette entry to read about it." }),
      shortcutTable());
  }

  /** transient: shown for the selection or a hovered palette entry, without switching to the info tab. */
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

  // --- gallery and lightbox -------------------------------------------------------------------------------------
  addToGallery(url, image, nodeId) {
    // a cached output is announced again on every run: show each file once, most recent first
    this.gallery = this.gallery.filter((entry) => entry.url !== url);
    this.gallery.unshift({ url, image, nodeId, title: this.canvas.titleOf(nodeId), time: new Date() });
    this.gallery.length = Math.min(this.gallery.length, GALLERY_LIMIT);
    this.renderGallery();
  }

  renderGallery() {
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

  hideImage() {
    $("#lightbox").hidden = true;
  }
}
