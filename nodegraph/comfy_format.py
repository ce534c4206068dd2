"""ComfyUI's workflow documents, read generically: which format a document is, the editor's (UI) format turned into
the API format as ComfyUI's browser does before queueing, and any supported document loaded as our ``Workflow``.

Three formats arrive at nodegraph: ours (``{"format": "nodegraph/workflow", ...}``), ComfyUI's API prompt
(``{id: {"class_type", "inputs"}}``, what ``POST /prompt`` runs) and ComfyUI's UI save file (litegraph: a ``nodes``
list and ``links``, version 0.4 or schema 1). This module knows the editor's own constructs (PrimitiveNode, Reroute,
Note, MarkdownNote, muted and bypassed nodes, subgraphs) but no ComfyUI node type: which node types exist, their
widget names and how they map onto ours is the node library's business (``Library.comfy``, see
``nodegraph.library``). Documents are untrusted: their size and nesting are bounded as ours are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .workflow import Limits, Workflow, WorkflowError, _check_depth, check_node_id, from_json, parse_json

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("nodegraph.comfy")

NODEGRAPH, COMFY_API, COMFY_UI = "nodegraph", "comfy_api", "comfy_ui"

#: Widgets the editor adds that are no inputs of the node: the seed's control-after-generate choice and an image
#: loader's upload button. ``widget_names`` lists them at their place in ``widgets_values``; they are skipped.
UI_ONLY_WIDGETS = frozenset({"control_after_generate", "upload"})

PRIMITIVE, REROUTE = "PrimitiveNode", "Reroute"
NOTES = frozenset({"Note", "MarkdownNote"})
MUTED, BYPASSED = 2, 4  # litegraph node modes ("never", "bypass")
# The ids a link inside a subgraph uses for the subgraph's own input and output slots.
SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20
MAX_SUBGRAPH_DEPTH = 16

WidgetNames = Callable[[str], list | None]


@dataclass(frozen=True)
class Unsupported:
    """One thing a ComfyUI workflow uses that nodegraph cannot run: which node, and why."""

    node_id: str
    class_type: str
    message: str
    input: str | None = None

    def __str__(self) -> str:
        where = f"node {self.node_id} ({self.class_type})"
        return f"{where}, input {self.input!r}: {self.message}" if self.input else f"{where}: {self.message}"


class UnsupportedWorkflow(WorkflowError):
    """A ComfyUI workflow uses node types or values nodegraph does not have; ``problems`` lists every one of them
    (the server turns them into ComfyUI's ``node_errors``, keyed by the ComfyUI node ids)."""

    def __init__(self, problems: Iterable[Unsupported],
                 what: str = "this ComfyUI workflow cannot run in nodegraph, so nothing ran"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{what} ({len(self.problems)} problem{'s' * (len(self.problems) != 1)}):\n{lines}")


# --------------------------------------------------------------------------------------------------------------------
# Which format
# --------------------------------------------------------------------------------------------------------------------


def detect(doc: Any) -> str:
    """"nodegraph", "comfy_api" or "comfy_ui"; a WorkflowError saying what was expected for anything else."""
    if isinstance(doc, dict):
        if "format" in doc:
            if doc["format"] == "nodegraph/workflow":
                return NODEGRAPH
        elif isinstance(doc.get("nodes"), list) and ("links" in doc or doc.get("version") in (0.4, 1)):
            return COMFY_UI
        elif doc and all(isinstance(node, dict) and isinstance(node.get("class_type"), str)
                         for node in doc.values()):
            return COMFY_API
    raise WorkflowError(
        "not a workflow nodegraph can read: expected a nodegraph workflow ({\"format\": \"nodegraph/workflow\", "
        "\"nodes\": {...}}), a ComfyUI API prompt ({node_id: {\"class_type\": ..., \"inputs\": {...}}}) or a "
        "ComfyUI workflow as its editor saves it (\"nodes\": [...] and \"links\": [...])")


def is_link(value: Any) -> bool:
    """Whether an API-format input is a link ``[source_id, output_index]``."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and not isinstance(value[0], bool) and isinstance(value[1], int) and not isinstance(value[1], bool))


def check_api(doc: Any, limits: Limits = Limits()) -> dict[str, dict]:
    """An API-format prompt with its shape checked: ids as strings, each node a class_type and an inputs object,
    links as ``[source_id_string, output_index]`` to nodes of the prompt."""
    _check_depth(doc, limits.max_depth)
    if not isinstance(doc, dict) or not doc:
        raise WorkflowError("a ComfyUI API prompt is a non-empty JSON object of nodes")
    if len(doc) > limits.max_nodes:
        raise WorkflowError(f"the workflow has {len(doc)} nodes, over the limit of {limits.max_nodes}")
    out: dict[str, dict] = {}
    for nid, node in doc.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise WorkflowError(f"node {nid}: a ComfyUI API node needs a \"class_type\"")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowError(f"node {nid} ({node['class_type']}): \"inputs\" must be an object")
        clean = {}
        for name, value in inputs.items():
            if is_link(value):
                value = [str(value[0]), value[1]]
                if value[0] not in doc:
                    raise WorkflowError(f"node {nid} ({node['class_type']}), input {name!r}: links to node "
                                        f"{value[0]}, which is not in the prompt")
            clean[name] = value
        out[str(nid)] = {**node, "inputs": clean}
    return out


# --------------------------------------------------------------------------------------------------------------------
# From the UI format to the API format
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Node:
    """One node of the flattened editor graph."""

    id: str
    type: str
    mode: int = 0
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    widgets_values: Any = None
    title: str | None = None
    pos: list | None = None
    # a subgraph instance: where each of its output slots comes from inside
    out_sources: dict | None = None
    # the pseudo node standing for a subgraph's input slots inside it: the instance it belongs to
    instance_of: str | None = None
    # a subgraph instance's own widget values (widgets promoted from inside), by its input slot
    promoted: dict = field(default_factory=dict)


def _links_by_id(links: Any, where: str) -> dict:
    """{link id: (origin id, origin slot, target id, target slot, type)} from arrays (0.4) or objects (schema 1),
    listed or keyed by id (older saves); empty entries are skipped."""
    table = {}
    for link in (links.values() if isinstance(links, dict) else links or ()):
        if link is None:
            continue
        if isinstance(link, list) and len(link) >= 5:
            lid, origin, oslot, target, tslot = link[:5]
            ltype = link[5] if len(link) > 5 else None
        elif isinstance(link, dict) and "origin_id" in link:
            lid, origin, oslot = link.get("id"), link["origin_id"], link.get("origin_slot", 0)
            target, tslot, ltype = link.get("target_id"), link.get("target_slot", 0), link.get("type")
        else:
            raise WorkflowError(f"{where}: a link is [id, origin, origin_slot, target, target_slot, type] or an "
                                f"object with origin_id/target_id, got {str(link)[:80]}")
        table[lid] = (origin, oslot, target, tslot, ltype)
    return table


class _Flattener:
    """The editor graph with subgraphs expanded: nodes by flattened id and where each input slot comes from."""

    def __init__(self, doc: dict, limits: Limits):
        self.limits = limits
        defs = (doc.get("definitions") or {}).get("subgraphs") or []
        if not isinstance(defs, list):
            raise WorkflowError("\"definitions.subgraphs\" must be a list")
        self.subgraphs = {d["id"]: d for d in defs if isinstance(d, dict) and "id" in d}
        self.nodes: dict[str, _Node] = {}
        self.sources: dict[tuple[str, int], tuple[str, int]] = {}
        self._expand(doc.get("nodes") or [], doc.get("links"), "", (), (0, 0))

    def _expand(self, nodes: list, links: Any, prefix: str, stack: tuple, offset: tuple) -> None:
        where = f"subgraph {stack[-1]!r}" if stack else "the workflow"
        table = _links_by_id(links, where)
        if not isinstance(nodes, list):
            raise WorkflowError(f"{where}: \"nodes\" must be a list")
        for raw in nodes:
            if not isinstance(raw, dict) or "id" not in raw or not isinstance(raw.get("type"), str):
                raise WorkflowError(f"{where}: every node needs an id and a type")
            nid = f"{prefix}{raw['id']}"
            if nid in self.nodes:
                raise WorkflowError(f"{where}: node id {raw['id']} is used twice")
            if len(self.nodes) >= self.limits.max_nodes:
                raise WorkflowError(f"the workflow has over {self.limits.max_nodes} nodes (subgraphs expanded)")
            pos = raw.get("pos")
            if isinstance(pos, dict):  # some versions save {"0": x, "1": y}
                pos = [pos.get("0", 0), pos.get("1", 0)]
            if isinstance(pos, list) and len(pos) >= 2 and all(isinstance(v, (int, float)) for v in pos[:2]):
                pos = [pos[0] + offset[0], pos[1] + offset[1]]
            else:
                pos = None
            inputs = raw.get("inputs") or []
            node = _Node(nid, raw["type"], raw.get("mode") or 0, inputs if isinstance(inputs, list) else [],
                         raw.get("outputs") or [], raw.get("widgets_values"), raw.get("title"), pos)
            self.nodes[nid] = node
            for slot, inp in enumerate(node.inputs):
                lid = inp.get("link") if isinstance(inp, dict) else None
                if lid is None or lid not in table:
                    continue
                origin, oslot = table[lid][0], table[lid][1]
                if origin == SUBGRAPH_INPUT:
                    self.sources[(nid, slot)] = (f"{prefix}in", oslot)
                else:
                    self.sources[(nid, slot)] = (f"{prefix}{origin}", oslot)
            definition = self.subgraphs.get(node.type)
            if definition is not None and node.mode not in (MUTED, BYPASSED):
                self._instance(node, definition, table, prefix, stack, where)

    def _instance(self, node: _Node, definition: dict, table: dict, prefix: str, stack: tuple, where: str) -> None:
        sid = definition["id"]
        if sid in stack or len(stack) >= MAX_SUBGRAPH_DEPTH:
            raise WorkflowError(f"{where}: subgraph {definition.get('name') or sid!r} contains itself")
        inner_prefix = f"{node.id}:"
        inner = definition.get("nodes") or []
        positions = [n.get("pos") for n in inner if isinstance(n, dict) and isinstance(n.get("pos"), list)
                     and len(n["pos"]) >= 2 and all(isinstance(v, (int, float)) for v in n["pos"][:2])]
        base = node.pos or [0, 0]
        offset = (base[0] - min((p[0] for p in positions), default=0), base[1] - min((p[1] for p in positions),
                                                                                     default=0))
        # the subgraph's input slots, seen from inside: a pseudo node whose output j is the instance's input j
        self.nodes[f"{inner_prefix}in"] = _Node(f"{inner_prefix}in", "<subgraph input>", instance_of=node.id)
        self._expand(inner, definition.get("links"), inner_prefix, (*stack, sid), offset)
        node.out_sources = {}
        for origin, oslot, target, tslot, _ in _links_by_id(definition.get("links"), f"subgraph {sid!r}").values():
            if target == SUBGRAPH_OUTPUT:
                node.out_sources[tslot] = (f"{inner_prefix}in" if origin == SUBGRAPH_INPUT
                                           else f"{inner_prefix}{origin}", oslot)
        # widgets promoted onto the instance: their values, by the subgraph input they stand for
        if isinstance(node.widgets_values, list):
            slots = [slot for slot, inp in enumerate(node.inputs) if isinstance(inp, dict) and inp.get("widget")]
            node.promoted = dict(zip(slots, node.widgets_values))


def _type_of(slot: Any) -> Any:
    return slot.get("type") if isinstance(slot, dict) else None


def _types_match(a: Any, b: Any) -> bool:
    if a in (None, "*", "") or b in (None, "*", ""):
        return True
    if isinstance(a, str) and isinstance(b, str):
        return bool(set(a.split(",")) & set(b.split(",")))
    return a == b


_NONE = object()


@dataclass(frozen=True)
class _Value:
    """What an input resolves to when a value, not an output, feeds it (a widget promoted onto a subgraph)."""

    value: Any


def _primitive_value(node: _Node) -> Any:
    values = node.widgets_values
    if isinstance(values, list) and values:
        return values[0]
    if isinstance(values, dict) and "value" in values:
        return values["value"]
    return _NONE


def _muted_branches(real: set[str], muted: set[str], fed_by_muted: set[str], uses: dict[str, set[str]]) -> set[str]:
    """The real nodes that go with the muted ones: what a muted node feeds cannot run (ComfyUI fails that branch),
    nor what that feeds; and a node whose every user is gone fed only the muted branch, which ComfyUI never runs."""
    gone = set(muted) | fed_by_muted
    changed = True
    while changed:
        changed = False
        for nid in real - gone:
            users = uses.get(nid, set())
            downstream = any(nid in uses.get(g, set()) for g in gone)  # fed by a node that is gone
            if downstream or (users and users <= gone):
                gone.add(nid)
                changed = True
    return gone & real


class _Converter:
    def __init__(self, graph: _Flattener, widget_names: WidgetNames):
        self.graph, self.widget_names = graph, widget_names
        self.nodes, self.sources = graph.nodes, graph.sources

    def resolve(self, origin: tuple[str, int] | None, want: Any) -> tuple[str, int] | _Value | None:
        """Follow reroutes, subgraph boundaries and bypassed nodes to the node that really produces a value (``want``:
        the type the input takes, which picks a bypassed node's input)."""
        seen = set()
        while origin is not None:
            if origin in seen:
                return None  # a loop of pass-throughs produces nothing
            seen.add(origin)
            oid, slot = origin
            node = self.nodes.get(oid)
            if node is None:
                return None
            if node.type == REROUTE:
                origin = self.sources.get((oid, 0))
            elif node.instance_of is not None:
                instance = self.nodes[node.instance_of]
                origin = self.sources.get((instance.id, slot))
                if origin is None and slot in instance.promoted:
                    return _Value(instance.promoted[slot])
            elif node.out_sources is not None:
                origin = node.out_sources.get(slot)
            elif node.mode == BYPASSED:
                if want in (None, "*") and slot < len(node.outputs):
                    want = _type_of(node.outputs[slot])
                order = [slot, *range(len(node.inputs))]
                matched = next((i for i in order if i < len(node.inputs) and _types_match(_type_of(node.inputs[i]),
                                                                                         want)), None)
                if matched is None:
                    return None
                origin = self.sources.get((oid, matched))
            else:
                return origin
        return None

    def widget_values(self, node: _Node) -> dict[str, Any]:
        names = self.widget_names(node.type)
        values = node.widgets_values
        if isinstance(values, dict):
            allowed = None if names is None else set(names)
            return {k: v for k, v in values.items()
                    if k not in UI_ONLY_WIDGETS and (allowed is None or k in allowed)}
        if not isinstance(values, list) or names is None:
            return {}
        real = [n for n in names if n not in UI_ONLY_WIDGETS]
        if len(values) == len(names):
            pairs = zip(names, values)
        elif len(values) == len(real):
            pairs = zip(real, values)  # saved without the editor-only entries
        else:
            log.warning("node %s (%s): %d widget values for the widgets %s; reading them in order", node.id,
                        node.type, len(values), ", ".join(real))
            pairs = zip(names, values)
        return {n: v for n, v in pairs if n not in UI_ONLY_WIDGETS}

    def convert(self) -> tuple[dict, dict]:
        real = {nid: n for nid, n in self.nodes.items() if self._runs(n)}
        muted = {nid for nid, n in self.nodes.items() if n.mode == MUTED and n.instance_of is None}
        api: dict[str, dict] = {}
        uses: dict[str, set[str]] = {}  # node -> the real or muted nodes that take one of its outputs
        fed_by_muted: set[str] = set()
        for nid in muted:
            for slot, inp in enumerate(self.nodes[nid].inputs):
                source = self.resolve(self.sources.get((nid, slot)), _type_of(inp))
                if isinstance(source, tuple):
                    uses.setdefault(source[0], set()).add(nid)
        for nid, node in real.items():
            inputs = self.widget_values(node)
            for slot, inp in enumerate(node.inputs):
                if not isinstance(inp, dict):
                    continue
                widget = inp.get("widget")
                name = (widget.get("name") if isinstance(widget, dict) else None) or inp.get("name")
                source = self.resolve(self.sources.get((nid, slot)), _type_of(inp))
                if source is None or name is None:
                    continue  # as in the browser: an input whose source is gone is left out (a widget keeps its value)
                if isinstance(source, _Value):
                    inputs[name] = source.value
                    continue
                origin = self.nodes[source[0]]
                if origin.type == PRIMITIVE:
                    value = _primitive_value(origin)
                    if value is not _NONE:
                        inputs[name] = value
                    continue
                uses.setdefault(source[0], set()).add(nid)
                if source[0] in muted:
                    fed_by_muted.add(nid)
                elif source[0] in real:
                    inputs[name] = [source[0], source[1]]
            api[nid] = {"class_type": node.type, "inputs": inputs, "_meta": {"title": node.title or node.type}}
        for nid in _muted_branches(set(real), muted, fed_by_muted, uses):
            api.pop(nid, None)
        return api, self._ui(api)

    def _runs(self, node: _Node) -> bool:
        return (node.type not in (PRIMITIVE, REROUTE) and node.type not in NOTES and node.mode not in (MUTED, BYPASSED)
                and node.out_sources is None and node.instance_of is None)

    def _ui(self, api: dict) -> dict:
        nodes = {}
        for nid in api:
            node = self.nodes[nid]
            entry: dict[str, Any] = {}
            if node.pos is not None:
                entry["pos"] = node.pos
            if node.title:
                entry["title"] = node.title
            nodes[nid] = entry
        notes = []
        for node in self.nodes.values():
            if node.type in NOTES and node.mode != MUTED:
                values = node.widgets_values
                text = values[0] if isinstance(values, list) and values else (
                    values.get("text", "") if isinstance(values, dict) else "")
                note: dict[str, Any] = {"text": text if isinstance(text, str) else str(text)}
                if node.pos is not None:
                    note["pos"] = node.pos
                notes.append(note)
        return {"nodes": nodes, "notes": notes}


def ui_to_api(doc: dict, widget_names: WidgetNames, limits: Limits = Limits()) -> tuple[dict, dict]:
    """A ComfyUI editor document as the API prompt the browser would queue, and its editor data.

    ``widget_names(class_type)`` gives a node type's widget names in ``widgets_values`` order (the editor-only
    entries of ``UI_ONLY_WIDGETS`` at their places), or None for a type the library does not know (its widget
    values are then left out; an object-shaped ``widgets_values`` is taken by name). PrimitiveNode values go into
    the widgets they feed, reroutes and subgraph boundaries are followed, bypassed nodes pass their first input of
    the matching type through, muted nodes go with the branch they feed, subgraphs are flattened with ids
    "instance:inner". Returns ``(prompt, {"nodes": {id: {"pos", "title"}}, "groups": [...], "notes": [...]})``.
    """
    _check_depth(doc, limits.max_depth)
    if detect(doc) != COMFY_UI:
        raise WorkflowError("not a ComfyUI editor workflow (\"nodes\": [...] and \"links\": [...])")
    graph = _Flattener(doc, limits)
    api, ui = _Converter(graph, widget_names).convert()
    groups = doc.get("groups")
    ui["groups"] = [g for g in groups if isinstance(g, dict)] if isinstance(groups, list) else []
    return api, ui


# --------------------------------------------------------------------------------------------------------------------
# Any document to a Workflow
# --------------------------------------------------------------------------------------------------------------------


def load_document(doc: Any, library: Any, settings: Settings | None = None,
                  limits: Limits = Limits()) -> tuple[Workflow, str]:
    """Any supported document (decoded JSON, or its text) as our Workflow, with the format it was in."""
    if isinstance(doc, (str, bytes)):
        doc = parse_json(doc, limits)
    fmt = detect(doc)  # looks at the top level only; each reader below checks the nesting
    if fmt == NODEGRAPH:
        return from_json(doc, limits), fmt
    comfy = getattr(library, "comfy", None)
    if comfy is None:
        raise WorkflowError("this node library cannot read ComfyUI workflows")
    if fmt == COMFY_UI:
        api, ui = ui_to_api(doc, comfy.widget_names, limits)
    else:
        api, ui = check_api(doc, limits), None
    workflow = comfy.to_workflow(api, ui, settings=settings)
    for nid in workflow.nodes:  # ids our format reads back (the canvas opens what the import gives)
        check_node_id(nid)
    return workflow, fmt


def auto_layout(workflow: Workflow, column: float = 320, row: float = 220) -> None:
    """Give nodes without a position one: a column per depth in the graph, in id order within it (an API prompt
    carries no layout; the canvas then shows the graph left to right)."""
    depth: dict[str, int] = {}

    def visit(start: str) -> int:
        # Iterative, so that a chain of thousands of nodes cannot exhaust the stack. A link to a missing node, or
        # back into the path being walked (a cycle, which validation reports), counts as depth 0.
        on_path = {start}
        stack = [(start, iter(_parents(workflow, start)))]
        while stack:
            nid, parents = stack[-1]
            for p in parents:
                if p in workflow.nodes and p not in depth and p not in on_path:
                    on_path.add(p)
                    stack.append((p, iter(_parents(workflow, p))))
                    break
            else:
                depth[nid] = 1 + max((depth.get(p, 0) for p in _parents(workflow, nid)), default=-1)
                on_path.discard(nid)
                stack.pop()
        return depth[start]

    rows: dict[int, int] = {}
    for nid in sorted(workflow.nodes, key=_order):
        node = workflow.nodes[nid]
        d = depth[nid] if nid in depth else visit(nid)
        r = rows.get(d, 0)
        rows[d] = r + 1
        if node.ui is None or "pos" not in node.ui:
            node.ui = {**(node.ui or {}), "pos": [d * column, r * row]}


def _parents(workflow: Workflow, nid: str) -> list[str]:
    return [link.node for _, link in workflow.nodes[nid].links()]


def _order(node_id: str) -> tuple:
    head, _, rest = node_id.partition(":")
    # isdigit() alone is also true of digits int() does not read ("²"), and int() refuses thousands of digits
    return (0, int(head), rest) if head.isascii() and head.isdigit() and len(head) < 100 else (1, 0, node_id)
