// The node palette (a searchable list by category, built from GET /object_info) and the quick-add popup.
// Click an entry to add the node in the middle of the view, or drag it onto the canvas.

import { inputAccepts, typesMatch } from "./graph.js";
import { h } from "./widgets.js";

/** Node types matching a search, best first. filter: {input: TYPE} keeps types with an input accepting TYPE,
 * {output: [TYPES]} types with an output one of TYPES accepts. */
export function searchDefs(defs, query = "", filter = null) {
  const q = query.trim().toLowerCase();
  const words = q.split(/\s+/).filter(Boolean);
  const scored = [];
  for (const def of defs.list()) {
    if (def.deprecated) continue;
    if (filter?.input && !def.inputs.some((s) => typesMatch(filter.input, inputAccepts(s)))) continue;
    if (filter?.output && !def.outputs.some((o) => typesMatch(o.type, filter.output))) continue;
    const name = def.name.toLowerCase();
    const display = def.display_name.toLowerCase();
    const category = def.category.toLowerCase();
    const description = def.description.toLowerCase();
    let score = 0;
    if (words.length) {
      for (const word of words) {
        let s = 0;
        if (name === word || display === word) s = 100;
        else if (name.startsWith(word) || display.startsWith(word)) s = 60;
        else if (name.includes(word) || display.includes(word)) s = 40;
        else if (category.split("/").some((c) => c.startsWith(word))) s = 25;
        else if (category.includes(word)) s = 15;
        else if (description.includes(word)) s = 5;
        if (!s) {
          score = -1;
          break;
        }
        score += s;
      }
      if (score < 0) continue;
    }
    scored.push({ def, score });
  }
  scored.sort((a, b) => b.score - a.score || a.def.category.localeCompare(b.def.category)
    || a.def.display_name.localeCompare(b.def.display_name));
  return scored.map((s) => s.def);
}

function firstLine(text) {
  return (text || "").split("\n")[0];
}

export class Palette {
  constructor(app, el) {
    this.app = app;
    this.el = el;
    this.search = h("input", { type: "search", class: "palette-search", placeholder: "Search nodes…",
      spellcheck: "false", "aria-label": "search nodes" });
    this.list = h("div", { class: "palette-list" });
    this.collapsed = new Set(JSON.parse(localStorage.getItem("nodegraph.palette.collapsed") || "[]"));
    el.append(h("div", { class: "palette-head" }, this.search), this.list);
    this.search.addEventListener("input", () => this.render());
    this.search.addEventListener("keydown", (e) => this._onKey(e));
    this.active = 0;
  }

  render() {
    const query = this.search.value;
    const defs = searchDefs(this.app.graph.defs, query);
    this.list.replaceChildren();
    this.items = [];
    if (!defs.length) {
      this.list.append(h("div", { class: "palette-empty", text: query ? "No node matches." : "No node types." }));
      return;
    }
    if (query.trim()) {
      for (const def of defs) this.list.append(this._item(def, true));
    } else {
      const byCategory = new Map();
      for (const def of defs) {
        if (!byCategory.has(def.category)) byCategory.set(def.category, []);
        byCategory.get(def.category).push(def);
      }
      for (const category of [...byCategory.keys()].sort()) {
        const open = !this.collapsed.has(category);
        const head = h("button", { type: "button", class: `palette-cat${open ? " open" : ""}`, "data-category": category },
          h("span", { class: "chev", text: open ? "▾" : "▸" }), h("span", { text: category }),
          h("span", { class: "count", text: String(byCategory.get(category).length) }));
        head.addEventListener("click", () => {
          if (this.collapsed.has(category)) this.collapsed.delete(category);
          else this.collapsed.add(category);
          localStorage.setItem("nodegraph.palette.collapsed", JSON.stringify([...this.collapsed]));
          this.render();
        });
        this.list.append(head);
        if (open) for (const def of byCategory.get(category)) this.list.append(this._item(def, false));
      }
    }
    this.active = 0;
    this._highlight();
  }

  _item(def, showCategory) {
    const item = h("div", { class: "palette-item", "data-type": def.name, title: def.description || def.name,
      role: "button", tabindex: "-1" },
    h("div", { class: "palette-name" }, h("span", { text: def.display_name }),
      def.display_name !== def.name ? h("span", { class: "palette-type", text: def.name }) : null,
      def.output_node ? h("span", { class: "palette-out", text: "output", title: "an output node" }) : null),
    showCategory ? h("div", { class: "palette-cat-label", text: def.category }) : null,
    def.description ? h("div", { class: "palette-desc", text: firstLine(def.description) }) : null);
    item.addEventListener("pointerdown", (e) => this._startDrag(e, def, item));
    item.addEventListener("mouseenter", () => this.app.showHelp(def.name, { transient: true }));
    item.addEventListener("mouseleave", () => this.app.onSelectionChange());
    this.items.push({ def, item });
    return item;
  }

  _highlight() {
    this.items.forEach(({ item }, i) => item.classList.toggle("active", i === this.active && !!this.search.value.trim()));
  }

  _onKey(e) {
    if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      e.preventDefault();
      const n = this.items.length;
      if (!n) return;
      this.active = (this.active + (e.key === "ArrowDown" ? 1 : n - 1)) % n;
      this._highlight();
      this.items[this.active].item.scrollIntoView({ block: "nearest" });
    } else if (e.key === "Enter") {
      const entry = this.items[this.active];
      if (entry) this.app.canvas.addNode(entry.def.name);
    } else if (e.key === "Escape") {
      this.search.value = "";
      this.render();
      this.app.canvas.root.focus();
    }
  }

  _startDrag(e, def, item) {
    if (e.button !== 0) return;
    e.preventDefault();
    const sx = e.clientX;
    const sy = e.clientY;
    let ghost = null;
    const move = (ev) => {
      if (!ghost && Math.hypot(ev.clientX - sx, ev.clientY - sy) > 5) {
        ghost = h("div", { class: "palette-ghost", text: def.display_name });
        document.body.append(ghost);
      }
      if (ghost) {
        ghost.style.left = `${ev.clientX + 8}px`;
        ghost.style.top = `${ev.clientY + 8}px`;
      }
    };
    const up = (ev) => {
      window.removeEventListener("pointermove", move);
      window.removeEventListener("pointerup", up);
      if (!ghost) {
        this.app.canvas.addNode(def.name);
        return;
      }
      ghost.remove();
      const canvasRect = this.app.canvas.root.getBoundingClientRect();
      if (ev.clientX >= canvasRect.left && ev.clientX <= canvasRect.right && ev.clientY >= canvasRect.top
          && ev.clientY <= canvasRect.bottom) {
        const [x, y] = this.app.canvas.screenToWorld(ev.clientX, ev.clientY);
        this.app.canvas.addNode(def.name, [x, y]);
      }
    };
    window.addEventListener("pointermove", move);
    window.addEventListener("pointerup", up);
    item.focus?.();
  }
}

/** A floating search box listing node types; picking one calls back with its name. */
export class QuickAdd {
  constructor(app) {
    this.app = app;
    this.el = h("div", { class: "ng-popup quick-add", hidden: true });
    this.input = h("input", { type: "search", class: "quick-add-search", placeholder: "Add a node…",
      spellcheck: "false" });
    this.hint = h("div", { class: "quick-add-hint" });
    this.list = h("div", { class: "quick-add-list" });
    this.el.append(this.input, this.hint, this.list);
    document.body.append(this.el);
    this.input.addEventListener("input", () => this.render());
    this.input.addEventListener("keydown", (e) => this._onKey(e));
  }

  get isOpen() {
    return !this.el.hidden;
  }

  open(x, y, filter, onPick) {
    this.filter = filter;
    this.onPick = onPick;
    this.input.value = "";
    this.hint.textContent = filter?.input ? `nodes taking ${filter.input}`
      : filter?.output ? `nodes giving ${filter.output.join(" or ")}` : "";
    this.hint.hidden = !filter;
    this.el.hidden = false;
    const w = 300;
    const hh = 340;
    this.el.style.left = `${Math.min(x, window.innerWidth - w - 8)}px`;
    this.el.style.top = `${Math.min(y, window.innerHeight - hh - 8)}px`;
    this.render();
    this.input.focus();
  }

  close() {
    this.el.hidden = true;
    this.onPick = null;
  }

  render() {
    this.results = searchDefs(this.app.graph.defs, this.input.value, this.filter).slice(0, 50);
    this.active = 0;
    this.list.replaceChildren();
    for (const [i, def] of this.results.entries()) {
      const row = h("div", { class: "quick-add-item", "data-type": def.name, title: def.description || def.name },
        h("span", { text: def.display_name }), h("span", { class: "quick-add-cat", text: def.category }));
      row.addEventListener("pointerdown", (e) => {
        e.preventDefault();
        this._pick(i);
      });
      this.list.append(row);
    }
    if (!this.results.length) this.list.append(h("div", { class: "palette-empty", text: "No node matches." }));
    this._highlight();
  }

  _highlight() {
    [...this.list.children].forEach((row, i) => row.classList.toggle("active", i === this.active));
  }

  _pick(i) {
    const def = this.results[i];
    const pick = this.onPick;
    this.close();
    if (def && pick) pick(def.name);
  }

  _onKey(e) {
    e.stopPropagation();
    if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      e.preventDefault();
      const n = this.results.length;
      if (!n) return;
      this.active = (this.active + (e.key === "ArrowDown" ? 1 : n - 1)) % n;
      this._highlight();
      this.list.children[this.active]?.scrollIntoView({ block: "nearest" });
    } else if (e.key === "Enter") {
      e.preventDefault();
      this._pick(this.active);
    } else if (e.key === "Escape") {
      this.close();
      this.app.canvas.root.focus();
    }
  }
}
