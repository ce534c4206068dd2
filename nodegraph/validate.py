"""Whole-graph validation and planning: every mistake at once, then the ordered list of nodes to run.

``compile_workflow`` checks a workflow against a registry and either returns a ``Plan`` (the nodes the requested
outputs need, each with its resolved inputs, in a deterministic topological order) or raises ``ValidationFailed``
carrying every ``ValidationError`` found. Every node is checked; only the ancestors of the requested outputs run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx

from .cache import static_key

from .node import Node
from .registry import Registry
from .settings import Settings
from .spec import Socket, types_compatible
from .workflow import Link, Workflow, _id_order


@dataclass(frozen=True)
class ValidationError:
    """One problem: where (node id, node type, input) and what (a machine-readable code, a human message)."""

    code: str
    message: str
    node_id: str | None = None
    node_type: str | None = None
    input: str | None = None

    def to_json(self) -> dict:
        return {"code": self.code, "message": self.message, "node_id": self.node_id,
                "node_type": self.node_type, "input": self.input}

    def __str__(self) -> str:
        where = []
        if self.node_id is not None:
            where.append(f"node {self.node_id}" + (f" ({self.node_type})" if self.node_type else ""))
        if self.input is not None:
            where.append(f"input {self.input!r}")
        return (", ".join(where) + ": " if where else "") + self.message


class ValidationFailed(Exception):
    """The workflow cannot run; ``errors`` lists every reason."""

    def __init__(self, errors: list[ValidationError]):
        self.errors = errors
        super().__init__(f"{len(errors)} validation error(s):\n" + "\n".join(f"  - {e}" for e in errors))

    def to_json(self) -> list[dict]:
        return [e.to_json() for e in self.errors]


@dataclass
class PlannedNode:
    """A node ready to run: its class and inputs split into literals (defaults filled in) and links, plus what
    its cache key needs, prepared once: the static part, the inputs whose identity is looked up at run time
    (files), and the links in a fixed order."""

    id: str
    type: type[Node]
    literals: dict[str, Any]
    links: dict[str, Link]
    static_key: str = ""
    dynamic: tuple[str, ...] = ()
    link_order: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        inputs = self.type.inputs
        self.dynamic = tuple(sorted(n for n in self.literals if inputs[n].dynamic_identity))
        plain = {n: v for n, v in self.literals.items() if n not in self.dynamic}
        self.static_key = static_key(self.type.name, self.type.version, plain)
        self.link_order = tuple(sorted((n, l.node, l.output) for n, l in self.links.items()))


@dataclass
class Plan:
    order: list[PlannedNode]
    targets: list[str]
    workflow: Workflow | None = None  # the document it came from (output nodes embed it in their files)
    by_id: dict[str, PlannedNode] = field(default_factory=dict)
    # Cache keys of a previous run, by output folder: valid while no node's key depends on anything but the plan.
    key_memo: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_id = {n.id: n for n in self.order}
        self.fixed_keys = all(n.type.cacheable and not n.dynamic for n in self.order)


def compile_workflow(workflow: Workflow, registry: Registry, outputs: Iterable[str] | None = None,
                     settings: Settings | None = None) -> Plan:
    """Validate ``workflow`` for the requested ``outputs`` (default: the workflow's own list, else every output
    node) and return the plan, or raise ``ValidationFailed`` with all errors. Choices computed from folders are
    checked against ``settings`` (the environment's when not given)."""
    settings = settings if settings is not None else Settings.from_env()
    errors: list[ValidationError] = []
    nodes = workflow.nodes
    types: dict[str, type[Node]] = {}
    for nid, entry in nodes.items():
        node_type = registry.get(entry.type)
        if node_type is None:
            errors.append(ValidationError("unknown_node_type", f"there is no node type {entry.type!r}", nid, entry.type))
        else:
            types[nid] = node_type

    targets = _targets(workflow, types, outputs, errors)

    # Nodes enter the graph sorted by id, so the topological order depends on the graph, not on the JSON key order.
    graph = nx.DiGraph()
    graph.add_nodes_from(sorted(nodes, key=_id_order))
    graph.add_edges_from((link.node, nid) for nid, entry in nodes.items() for _, link in entry.links()
                         if link.node in nodes)
    needed = _ancestors_and_self(graph, targets)

    # Every node is checked, not only those the outputs need: the user hears of every mistake at once.
    planned: dict[str, PlannedNode] = {}
    for nid, entry in nodes.items():
        if nid in types:
            node = _check_node(nid, entry, types[nid], workflow, types, errors, settings)
            if node is not None:
                planned[nid] = node

    try:
        order = [planned[nid] for nid in nx.topological_sort(graph) if nid in needed and nid in planned]
    except nx.NetworkXUnfeasible:
        order = []
        for component in nx.strongly_connected_components(graph):
            if len(component) > 1 or graph.has_edge(next(iter(component)), next(iter(component))):
                members = ", ".join(sorted(component, key=_id_order))
                first = min(component, key=_id_order)
                errors.append(ValidationError("cycle", f"the graph has a cycle through nodes {members}", first,
                                              nodes[first].type))
    if errors:
        raise ValidationFailed(errors)
    return Plan(order, targets, workflow)


def _ancestors_and_self(graph: nx.DiGraph, targets: list[str]) -> set[str]:
    # One walk from all targets at once: linear in the graph, however many outputs are requested.
    needed = set(targets)
    stack = list(targets)
    while stack:
        for parent in graph.pred[stack.pop()]:
            if parent not in needed:
                needed.add(parent)
                stack.append(parent)
    return needed


def _targets(workflow: Workflow, types: dict[str, type[Node]], outputs: Iterable[str] | None,
             errors: list[ValidationError]) -> list[str]:
    requested = list(outputs) if outputs is not None else workflow.outputs
    if requested is None:
        found = [nid for nid, t in types.items() if t.output_node]
        if not found and len(types) == len(workflow.nodes):
            errors.append(ValidationError("no_outputs", "the workflow has no output node (such as SaveImage), "
                                                        "so running it would produce nothing"))
        return sorted(found, key=_id_order)
    targets = []
    for nid in requested:
        nid = str(nid)
        if nid not in workflow.nodes:
            errors.append(ValidationError("unknown_output", f"the requested output node {nid!r} does not exist", nid))
        else:
            targets.append(nid)
    if not requested:
        errors.append(ValidationError("no_outputs", "no output node was requested"))
    return targets


def _check_node(nid: str, entry, node_type: type[Node], workflow: Workflow, types: dict[str, type[Node]],
                errors: list[ValidationError], settings: Settings) -> PlannedNode | None:
    start = len(errors)

    def error(code: str, message: str, input_name: str | None = None) -> None:
        errors.append(ValidationError(code, message, nid, node_type.name, input_name))

    inputs = dict(entry.inputs)
    if entry.version is not None and entry.version != node_type.version:
        if entry.version > node_type.version:
            error("node_version_too_new", f"this workflow was saved with version {entry.version} of "
                                          f"{node_type.name}; this installation has version {node_type.version}")
            return None
        try:
            inputs = node_type.migrate(entry.version, inputs)
        except Exception as exc:
            error("node_version_unsupported", str(exc))
            return None

    for name in inputs:
        if name not in node_type.inputs:
            known = ", ".join(node_type.inputs) or "none"
            error("unknown_input", f"{node_type.name} has no input {name!r} (its inputs: {known})", name)

    literals: dict[str, Any] = {}
    links: dict[str, Link] = {}
    for name, spec in node_type.inputs.items():
        if name not in inputs:
            if spec.has_default and not isinstance(spec, Socket):
                literals[name] = spec.default
            elif not spec.optional:
                what = "link" if isinstance(spec, Socket) else "value"
                error("missing_input", f"required input {name!r} has no {what}", name)
            continue
        value = inputs[name]
        if isinstance(value, Link):
            source = workflow.nodes.get(value.node)
            if source is None:
                error("missing_link_source", f"linked to node {value.node!r}, which does not exist", name)
                continue
            source_type = types.get(value.node)
            if source_type is None:
                continue  # already reported as an unknown node type
            out = source_type.output_types.get(value.output)
            if out is None:
                outs = ", ".join(o.name for o in source_type.outputs) or "none"
                error("missing_link_output", f"linked to output {value.output!r} of node {value.node} "
                                             f"({source_type.name}), which has no such output (its outputs: {outs})",
                      name)
            elif not types_compatible(out, spec.accepts):
                error("type_mismatch", f"expects {'/'.join(spec.accepts)} but is linked to output "
                                       f"{value.output!r} of node {value.node} ({source_type.name}), "
                                       f"which carries {out}", name)
            else:
                links[name] = value
        else:
            problems = spec.check(value, settings)
            for problem in problems:
                error(problem.code, problem.message, name)
            if not problems:
                literals[name] = spec.normalise(value)
    if len(errors) > start:
        return None
    return PlannedNode(nid, node_type, literals, links)
