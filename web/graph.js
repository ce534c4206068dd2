// The graph model: node type declarations, nodes and links, the workflow JSON format, and undo history.
//
// A node keeps its inputs exactly as the workflow format writes them: a literal value, or {"link": [id, output]}.
// When a link replaces a widget's value the value is stashed, so disconnecting gives it back. Everything the
// model does not understand (unknown node types, unknown inputs, groups, notes, meta, extra "ui" fields) is kept
// verbatim and written back on save.

export const FORMAT = "nodegraph/workflow";
export const VERSION = 1;

// --- types ----------------------------------------------------------------------------------------------------

export function splitTypes(type) {
  return String(type ?? "*").split("/").map((t) => t.trim()).filter(Boolean);
}

/** The link types an input accepts (a socket's own types; a widget its type; a choice COMBO or STRING). */
export function inputAccepts(spec) {
  if (!spec) return ["*"];
  if (spec.kind === "socket") return splitTypes(spec.type);
  if (spec.kind === "COMBO") return ["COMBO", "STRING"];
  return [spec.type || spec.kind];
}

export function typesMatch(outputType, accepts) {
  const outs = splitTypes(outputType);
  if (outs.includes("*") || accepts.includes("*")) return true;
  return outs.some((t) => accepts.includes(t));
}

export function isWidget(spec) {
  return !!spec && spec.kind !== "socket";
}

export function isLink(value) {
  return !!value && typeof value === "object" && !Array.isArray(value) && Array.isArray(value.link)
    && value.link.length === 2;
}

export function clone(value) {
  return value === undefined ? undefined : JSON.parse(JSON.stringify(value));
}

/** The value a new widget starts with (undefined: leave the input out, e.g. an optional input with no default). */
export function defaultValue(spec) {
  if (spec.default !== undefined && spec.default !== null) return clone(spec.default);
  if (spec.optional) return undefined;
  switch (spec.kind) {
    case "INT":
    case "FLOAT": {
      let v = 0;
      if (typeof spec.min === "number" && v < spec.min) v = spec.min;
      if (typeof spec.max === "number" && v > spec.max) v = spec.max;
      return v;
    }
    case "STRING": return "";
    case "BOOLEAN": return false;
    case "COMBO": return (spec.options && spec.options.length) ? spec.options[0] : "";
    case "LIST": return [];
    default: return undefined;
  }
}

/** Node type declarations, from GET /object_info (each entry's "nodegraph" field). */
export class NodeDefs {
  constructor(objectInfo = {}) {
    this.byName = new Map();
    for (const [name, info] of Object.entries(objectInfo || {})) {
      const decl = info && info.nodegraph;
      if (!decl) continue;
      this.byName.set(name, {
        ...decl,
        inputs: decl.inputs || [],
        outputs: decl.outputs || [],
        display_name: decl.display_name || name,
        category: decl.category || "misc",
        description: decl.description || "",
      });
    }
  }

  get(name) {
    return this.byName.get(name) || null;
  }

  list() {
    return [...this.byName.values()];
  }

  input(type, name) {
    const def = this.get(type);
    return def ? def.inputs.find((i) => i.name === name) || null : null;
  }
}

// --- the graph --------------------------------------------------------------------------------------------------

export class GraphNode {
  constructor(id, type) {
    this.id = id;
    this.type = type;
    this.inputs = {};
    this.ui = {};
    this.version = undefined;
    this.stash = {}; // widget values hidden by a link
  }

  get pos() {
    const p = this.ui.pos;
    return Array.isArray(p) && p.length >= 2 ? p : [0, 0];
  }

  set pos([x, y]) {
    this.ui.pos = [Math.round(x), Math.round(y)];
  }

  link(name) {
    const v = this.inputs[name];
    return isLink(v) ? v.link : null;
  }

  toJSON() {
    const out = { type: this.type, inputs: clone(this.inputs) };
    if (this.version !== undefined) out.version = this.version;
    if (this.ui && Object.keys(this.ui).length) out.ui = clone(this.ui);
    return out;
  }
}

const TOP_KEYS = ["groups", "notes", "meta", "outputs"];

export class Graph {
  constructor(defs = new NodeDefs()) {
    this.defs = defs;
    this.clear();
  }

  clear() {
    this.nodes = new Map();
    this.groups = undefined;
    this.notes = undefined;
    this.meta = undefined;
    this.outputs = undefined;
    this.extra = {}; // unknown top-level keys, kept so the server can name them
  }

  // --- reading ------------------------------------------------------------------------------------------------
  node(id) {
    return this.nodes.get(String(id)) || null;
  }

  def(id) {
    const node = this.node(id);
    return node ? this.defs.get(node.type) : null;
  }

  /** The input declarations of a node: its type's, or for an unknown type one "*" socket per input it has. */
  inputSpecs(id) {
    const node = this.node(id);
    if (!node) return [];
    const def = this.defs.get(node.type);
    if (def) return def.inputs;
    return Object.keys(node.inputs).map((name) => ({ name, kind: isLink(node.inputs[name]) ? "socket" : "unknown",
      type: "*", optional: true }));
  }

  inputSpec(id, name) {
    return this.inputSpecs(id).find((s) => s.name === name) || null;
  }

  /** Output declarations; for an unknown type, the outputs that links use. */
  outputSpecs(id) {
    const node = this.node(id);
    if (!node) return [];
    const def = this.defs.get(node.type);
    if (def) return def.outputs;
    const used = [];
    for (const other of this.nodes.values()) {
      for (const value of Object.values(other.inputs)) {
        if (isLink(value) && value.link[0] === node.id && !used.includes(value.link[1])) used.push(value.link[1]);
      }
    }
    return used.map((name) => ({ name, type: "*" }));
  }

  outputType(id, name) {
    const out = this.outputSpecs(id).find((o) => o.name === name);
    return out ? out.type : null;
  }

  /** Every link: {from, output, to, input, type}. */
  links() {
    const out = [];
    for (const node of this.nodes.values()) {
      for (const [name, value] of Object.entries(node.inputs)) {
        if (!isLink(value)) continue;
        const [from, output] = value.link;
        out.push({ from, output, to: node.id, input: name, type: this.outputType(from, output) || "*" });
      }
    }
    return out;
  }

  nextId() {
    let max = 0;
    for (const id of this.nodes.keys()) {
      if (/^\d+$/.test(id)) max = Math.max(max, Number(id));
    }
    return String(max + 1);
  }

  /** Whether `ancestor` feeds `id`, directly or not. */
  feeds(ancestor, id) {
    const seen = new Set();
    const stack = [String(id)];
    while (stack.length) {
      const current = stack.pop();
      if (current === ancestor) return true;
      if (seen.has(current)) continue;
      seen.add(current);
      const node = this.node(current);
      if (!node) continue;
      for (const value of Object.values(node.inputs)) {
        if (isLink(value)) stack.push(value.link[0]);
      }
    }
    return false;
  }

  /** Whether output `output` of `from` may feed input `input` of `to`: {ok, reason}. */
  canConnect(from, output, to, input) {
    from = String(from);
    to = String(to);
    const source = this.node(from);
    const target = this.node(to);
    if (!source || !target) return { ok: false, reason: "no such node" };
    const type = this.outputType(from, output);
    if (type === null) return { ok: false, reason: `${source.type} has no output "${output}"` };
    const spec = this.inputSpec(to, input);
    if (!spec) return { ok: false, reason: `${target.type} has no input "${input}"` };
    const accepts = inputAccepts(spec);
    if (!typesMatch(type, accepts)) {
      return { ok: false, reason: `${input} accepts ${accepts.join(" or ")}, not ${type}` };
    }
    if (from === to || this.feeds(to, from)) return { ok: false, reason: "that link would make a cycle" };
    return { ok: true, reason: "" };
  }

  // --- editing ------------------------------------------------------------------------------------------------
  addNode(type, pos = [0, 0], { id, inputs, ui, version } = {}) {
    id = id !== undefined ? String(id) : this.nextId();
    if (this.nodes.has(id)) throw new Error(`node id ${id} is already used`);
    const node = new GraphNode(id, type);
    const def = this.defs.get(type);
    if (def) {
      for (const spec of def.inputs) {
        if (spec.kind === "socket") continue;
        const value = defaultValue(spec);
        if (value !== undefined) node.inputs[spec.name] = value;
      }
      node.version = def.version;
    }
    if (version !== undefined) node.version = version;
    if (inputs) Object.assign(node.inputs, clone(inputs));
    node.ui = ui ? clone(ui) : {};
    node.pos = pos;
    this.nodes.set(id, node);
    return node;
  }

  removeNode(id) {
    id = String(id);
    if (!this.nodes.delete(id)) return;
    for (const node of this.nodes.values()) {
      for (const [name, value] of Object.entries(node.inputs)) {
        if (isLink(value) && value.link[0] === id) this.disconnect(node.id, name);
      }
    }
    if (Array.isArray(this.outputs) && this.outputs.includes(id)) {
      this.outputs = this.outputs.filter((o) => o !== id);
      if (!this.outputs.length) this.outputs = undefined;
    }
  }

  connect(from, output, to, input) {
    const check = this.canConnect(from, output, to, input);
    if (!check.ok) return check;
    const target = this.node(to);
    const current = target.inputs[input];
    if (current !== undefined && !isLink(current)) target.stash[input] = current;
    target.inputs[input] = { link: [String(from), output] };
    return check;
  }

  disconnect(id, input) {
    const node = this.node(id);
    if (!node || !isLink(node.inputs[input])) return false;
    delete node.inputs[input];
    const spec = this.defs.input(node.type, input);
    if (input in node.stash) {
      node.inputs[input] = node.stash[input];
      delete node.stash[input];
    } else if (spec && spec.kind !== "socket") {
      const value = defaultValue(spec);
      if (value !== undefined) node.inputs[input] = value;
    }
    return true;
  }

  setValue(id, input, value) {
    const node = this.node(id);
    if (!node) return;
    if (value === undefined) delete node.inputs[input];
    else node.inputs[input] = value;
  }

  // --- the workflow format ------------------------------------------------------------------------------------
  toJSON() {
    const doc = { format: FORMAT, version: VERSION, nodes: {} };
    for (const node of this.nodes.values()) doc.nodes[node.id] = node.toJSON();
    for (const key of TOP_KEYS) {
      if (this[key] !== undefined) doc[key] = clone(this[key]);
    }
    Object.assign(doc, clone(this.extra));
    return doc;
  }

  /** Replace the graph with a workflow document; throws an Error saying why a document is refused. */
  load(doc) {
    if (!doc || typeof doc !== "object" || Array.isArray(doc)) throw new Error("a workflow must be a JSON object");
    if (doc.format !== FORMAT) {
      throw new Error(`not a nodegraph workflow: "format" must be "${FORMAT}"`);
    }
    if (typeof doc.version !== "number" || doc.version > VERSION) {
      throw new Error(`this workflow is format version ${doc.version}; this canvas reads version ${VERSION}`);
    }
    if (!doc.nodes || typeof doc.nodes !== "object" || Array.isArray(doc.nodes)) {
      throw new Error("\"nodes\" must be an object mapping node ids to nodes");
    }
    const nodes = new Map();
    for (const [id, raw] of Object.entries(doc.nodes)) {
      if (!raw || typeof raw !== "object" || typeof raw.type !== "string") {
        throw new Error(`node ${id} has no "type"`);
      }
      const node = new GraphNode(String(id), raw.type);
      node.inputs = raw.inputs && typeof raw.inputs === "object" ? clone(raw.inputs) : {};
      node.ui = raw.ui && typeof raw.ui === "object" ? clone(raw.ui) : {};
      node.version = raw.version;
      const def = this.defs.get(raw.type);
      if (def) {
        for (const spec of def.inputs) {
          if (spec.kind === "socket" || spec.name in node.inputs) continue;
          const value = defaultValue(spec);
          if (value !== undefined) node.inputs[spec.name] = value;
        }
      }
      nodes.set(node.id, node);
    }
    this.clear();
    this.nodes = nodes;
    for (const key of TOP_KEYS) {
      if (doc[key] !== undefined) this[key] = clone(doc[key]);
    }
    for (const [key, value] of Object.entries(doc)) {
      if (!["format", "version", "nodes", ...TOP_KEYS].includes(key)) this.extra[key] = clone(value);
    }
    return this;
  }

  /** The nodes `ids` as a self-contained fragment for the clipboard. */
  fragment(ids) {
    const nodes = {};
    let minX = Infinity;
    let minY = Infinity;
    for (const id of ids) {
      const node = this.node(id);
      if (!node) continue;
      nodes[node.id] = node.toJSON();
      minX = Math.min(minX, node.pos[0]);
      minY = Math.min(minY, node.pos[1]);
    }
    return { kind: "nodegraph/fragment", nodes, origin: [minX, minY] };
  }

  /** Add a fragment's nodes with fresh ids, its top-left corner at `at`; links inside the fragment are kept, links
   * from outside only with `keepExternal` (and when their source still exists). Returns the new ids. */
  paste(fragment, at, { keepExternal = false } = {}) {
    const ids = Object.keys(fragment.nodes || {});
    const map = new Map();
    let next = Number(this.nextId());
    for (const id of ids) map.set(id, String(next++));
    const [ox, oy] = fragment.origin || [0, 0];
    const added = [];
    for (const id of ids) {
      const raw = fragment.nodes[id];
      const ui = clone(raw.ui || {});
      const pos = Array.isArray(ui.pos) ? ui.pos : [ox, oy];
      const node = this.addNode(raw.type, [pos[0] - ox + at[0], pos[1] - oy + at[1]],
        { id: map.get(id), ui, version: raw.version });
      node.inputs = {};
      for (const [name, value] of Object.entries(raw.inputs || {})) {
        if (!isLink(value)) {
          node.inputs[name] = clone(value);
        } else if (map.has(value.link[0])) {
          node.inputs[name] = { link: [map.get(value.link[0]), value.link[1]] };
        } else if (keepExternal && this.node(value.link[0]) && !ids.includes(value.link[0])) {
          node.inputs[name] = clone(value);
        } else {
          const spec = this.defs.input(raw.type, name);
          const fallback = spec && spec.kind !== "socket" ? defaultValue(spec) : undefined;
          if (fallback !== undefined) node.inputs[name] = fallback;
        }
      }
      added.push(node.id);
    }
    return added;
  }
}

// --- undo history -----------------------------------------------------------------------------------------------

/** Snapshots of the workflow JSON: push after each finished edit, undo/redo give back the snapshot to load. */
export class History {
  constructor(limit = 200) {
    this.limit = limit;
    this.stack = [];
    this.index = -1;
  }

  reset(snapshot) {
    this.stack = [snapshot];
    this.index = 0;
  }

  get current() {
    return this.stack[this.index];
  }

  push(snapshot) {
    if (snapshot === this.stack[this.index]) return false;
    this.stack.splice(this.index + 1);
    this.stack.push(snapshot);
    if (this.stack.length > this.limit) this.stack.shift();
    this.index = this.stack.length - 1;
    return true;
  }

  canUndo() {
    return this.index > 0;
  }

  canRedo() {
    return this.index < this.stack.length - 1;
  }

  undo() {
    return this.canUndo() ? this.stack[--this.index] : null;
  }

  redo() {
    return this.canRedo() ? this.stack[++this.index] : null;
  }
}
