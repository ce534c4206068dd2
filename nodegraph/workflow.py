"""The workflow document: one versioned JSON format for the canvas, the CLI, the HTTP API and PNG metadata.

```json
{
  "format": "nodegraph/workflow",
  "version": 1,
  "nodes": {
    "1": {"type": "Number", "inputs": {"value": 2}},
    "2": {"type": "Show", "inputs": {"value": {"link": ["1", "value"]}},
          "ui": {"pos": [300, 0], "title": "Result"}}
  },
  "groups": [{"title": "Inputs", "bounding": [0, 0, 250, 120]}],
  "notes": [{"text": "...", "pos": [0, 200]}],
  "meta": {}
}
```

An input is a literal value or a link ``{"link": [node_id, output_name]}``. ``ui`` (per node), ``groups``, ``notes``
and ``meta`` belong to the editor and are kept verbatim. Loading parses and checks the shape only: it executes
nothing, and saving a loaded workflow gives back the same document. The document is untrusted input, so its size,
nesting depth and node count are bounded before anything else looks at it.
"""

from __future__ import annotations

import copy
import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

FORMAT = "nodegraph/workflow"
VERSION = 1

# Migrations from older format versions: MIGRATIONS[v] turns a version-v document into a version-(v+1) one.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}

_NODE_KEYS = {"type", "inputs", "ui", "version"}
MAX_ID = 256  # characters in a node id
_TOP_KEYS = {"format", "version", "nodes", "groups", "notes", "meta", "outputs"}


class WorkflowError(ValueError):
    """The document is not a workflow this version can read; the message says why."""


@dataclass(frozen=True)
class Limits:
    """Bounds on untrusted documents, checked before parsing goes further."""

    max_bytes: int = 32 * 1024 * 1024
    max_depth: int = 64
    max_nodes: int = 10_000


@dataclass(frozen=True)
class Link:
    """A reference to the output ``output`` of node ``node``."""

    node: str
    output: str

    def to_json(self) -> dict:
        return {"link": [self.node, self.output]}


def is_link(value: Any) -> bool:
    return isinstance(value, Link)


@dataclass
class NodeEntry:
    """One node of a workflow: its type, its inputs (literals or ``Link``s), and free-form editor data."""

    type: str
    inputs: dict[str, Any] = field(default_factory=dict)
    ui: dict | None = None
    version: int | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"type": self.type,
                               "inputs": {k: (v.to_json() if isinstance(v, Link) else v) for k, v in self.inputs.items()}}
        if self.version is not None:
            out["version"] = self.version
        if self.ui is not None:
            out["ui"] = self.ui
        return out

    def links(self) -> list[tuple[str, Link]]:
        return [(name, v) for name, v in self.inputs.items() if isinstance(v, Link)]


@dataclass
class Workflow:
    """A parsed workflow document."""

    nodes: dict[str, NodeEntry] = field(default_factory=dict)
    groups: list | None = None
    notes: list | None = None
    meta: dict | None = None
    outputs: list[str] | None = None

    # --- building and editing from Python -------------------------------------------------------------------------
    def add(self, node_id: str | int, type: str, **inputs: Any) -> str:
        node_id = str(node_id)
        if node_id in self.nodes:
            raise WorkflowError(f"node id {node_id!r} is already used")
        self.nodes[node_id] = NodeEntry(type, dict(inputs))
        return node_id

    def set(self, node_id: str | int, input_name: str, value: Any) -> None:
        """Override one input (``--set NODE.INPUT=VALUE`` on the CLI)."""
        node_id = str(node_id)
        if node_id not in self.nodes:
            raise WorkflowError(f"there is no node {node_id!r} in this workflow "
                                f"(nodes: {', '.join(sorted(self.nodes, key=_id_order))})")
        self.nodes[node_id].inputs[input_name] = value

    def copy(self) -> "Workflow":
        return copy.deepcopy(self)

    # --- serialisation --------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION,
                               "nodes": {nid: n.to_json() for nid, n in self.nodes.items()}}
        for key in ("groups", "notes", "meta", "outputs"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def dumps(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_json(), indent=indent, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash never leaves a half-written workflow behind."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.dumps() + "\n", encoding="utf-8")
        tmp.replace(path)


def loads(text: str | bytes, limits: Limits = Limits()) -> Workflow:
    """Parse a workflow from JSON text."""
    return from_json(parse_json(text, limits), limits)


def parse_json(text: str | bytes, limits: Limits = Limits()) -> Any:
    """Untrusted JSON text, decoded within the size and nesting limits (a WorkflowError otherwise)."""
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > limits.max_bytes:
        raise WorkflowError(f"the document is {size} bytes, over the limit of {limits.max_bytes}")
    try:
        doc = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except WorkflowError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"the document is not valid JSON: {exc}") from None
    except RecursionError:
        # the decoder recurses in C: past the interpreter's limit it gives up before our (lower) limit is checked
        raise WorkflowError(f"the document is nested deeper than {limits.max_depth} levels") from None
    except ValueError:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
        raise WorkflowError("the document holds a number with too many digits to read") from None
    return doc


def _no_constant(name: str) -> Any:
    # NaN and Infinity are no JSON: accepted, they would come back out in answers no JSON parser reads
    raise WorkflowError(f"the document is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise WorkflowError(f"the document holds the number {text[:40]}, too large for a float")
    return value


def load(path: str | Path, limits: Limits = Limits()) -> Workflow:
    """Read a workflow from a JSON file, or from a PNG that carries one (as SaveImage writes them)."""
    return loads(read_document(path), limits)


def read_document(path: str | Path, png_keys: tuple[str, ...] = (), what: str = "a nodegraph workflow"
                  ) -> bytes | str:
    """A workflow file's JSON text: the file itself, or from a PNG the first of ``png_keys`` among its text
    chunks; a WorkflowError naming the file otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WorkflowError(f"cannot read workflow {path}: {exc.strerror or exc}") from None
    if not data.startswith(PNG_SIGNATURE):
        return data
    chunks = png_text(data)
    text = next((chunks[k] for k in png_keys or (PNG_KEY,) if k in chunks), None)
    if text is None:
        raise WorkflowError(f"{path} is a PNG without {what} in it")
    return text


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEY = "nodegraph_workflow"  # the PNG text chunk keyword under which images carry their workflow


def png_text(data: bytes) -> dict[str, str]:
    """The tEXt, zTXt and iTXt chunks of a PNG, by keyword (standard library only)."""
    out: dict[str, str] = {}
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        try:
            if kind == b"tEXt":
                key, _, value = body.partition(b"\0")
                out[key.decode("latin-1")] = value.decode("latin-1")
            elif kind == b"zTXt":
                key, _, value = body.partition(b"\0")
                out[key.decode("latin-1")] = _inflate(value[1:]).decode("latin-1")
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, rest = rest[0], rest[2:]
                _, _, rest = rest.partition(b"\0")  # language tag
                _, _, value = rest.partition(b"\0")  # translated keyword
                out[key.decode("latin-1")] = (_inflate(value) if compressed else value).decode("utf-8")
        except (zlib.error, UnicodeDecodeError, IndexError):
            continue  # a damaged chunk (or one that inflates past the limit) is skipped, not fatal
        if kind == b"IEND":
            break
    return out


def _inflate(data: bytes, limit: int = Limits().max_bytes) -> bytes:
    # A few kilobytes of zlib can inflate to gigabytes: stop at the size a document may have.
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, limit + 1)
    if len(out) > limit:
        raise zlib.error(f"the text inflates past {limit} bytes")
    return out


def from_json(doc: Any, limits: Limits = Limits()) -> Workflow:
    """Build a ``Workflow`` from a decoded JSON document, migrating older format versions."""
    check_depth(doc, limits.max_depth)
    if not isinstance(doc, dict):
        raise WorkflowError("a workflow must be a JSON object")
    if doc.get("format") != FORMAT:
        raise WorkflowError(f"not a nodegraph workflow: \"format\" must be {FORMAT!r}, got {doc.get('format')!r}")
    doc = _migrate(doc)
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise WorkflowError(f"unknown top-level key(s): {', '.join(unknown)}")
    nodes = doc.get("nodes")
    if not isinstance(nodes, dict):
        raise WorkflowError("\"nodes\" must be an object mapping node ids to nodes")
    if len(nodes) > limits.max_nodes:
        raise WorkflowError(f"the workflow has {len(nodes)} nodes, over the limit of {limits.max_nodes}")
    wf = Workflow()
    for nid, raw in nodes.items():
        check_node_id(nid)
        wf.nodes[nid] = _parse_node(nid, raw)
    for key, kind in (("groups", list), ("notes", list), ("meta", dict), ("outputs", list)):
        if key in doc:
            if not isinstance(doc[key], kind):
                raise WorkflowError(f"\"{key}\" must be a JSON {'array' if kind is list else 'object'}")
            setattr(wf, key, doc[key])
    if wf.outputs is not None and not all(isinstance(o, str) for o in wf.outputs):
        raise WorkflowError("\"outputs\" must list node ids (strings)")
    return wf


def check_node_id(nid: str) -> None:
    """A WorkflowError unless ``nid`` is printable text of 1 to ``MAX_ID`` characters."""
    if not nid or len(nid) > MAX_ID or not nid.isprintable():
        # errors are reported by node id: an empty one reads as "no node", an unprintable one cannot be shown
        raise WorkflowError(f"node id {nid[:40]!r} must be printable text of 1 to {MAX_ID} characters")


def _parse_node(nid: str, raw: Any) -> NodeEntry:
    where = f"node {nid!r}"
    if not isinstance(raw, dict):
        raise WorkflowError(f"{where} must be a JSON object")
    unknown = sorted(set(raw) - _NODE_KEYS)
    if unknown:
        raise WorkflowError(f"{where} has unknown key(s): {', '.join(unknown)}")
    if not isinstance(raw.get("type"), str) or not raw["type"]:
        raise WorkflowError(f"{where} has no \"type\"")
    inputs = raw.get("inputs", {})
    if not isinstance(inputs, dict):
        raise WorkflowError(f"{where}: \"inputs\" must be an object")
    parsed = {}
    for name, value in inputs.items():
        if isinstance(value, dict) and "link" in value:
            link = value["link"]
            if (len(value) != 1 or not isinstance(link, list) or len(link) != 2
                    or not all(isinstance(part, str) for part in link)):
                raise WorkflowError(f"{where}, input {name!r}: a link is {{\"link\": [node_id, output_name]}}")
            value = Link(link[0], link[1])
        parsed[name] = value
    ui = raw.get("ui")
    if ui is not None and not isinstance(ui, dict):
        raise WorkflowError(f"{where}: \"ui\" must be an object")
    version = raw.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise WorkflowError(f"{where}: \"version\" must be a positive integer")
    return NodeEntry(raw["type"], parsed, ui, version)


def _migrate(doc: dict) -> dict:
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise WorkflowError(f"\"version\" must be an integer, got {version!r}")
    if version > VERSION:
        raise WorkflowError(f"this workflow is format version {version}, written by a newer nodegraph; "
                            f"this one reads versions up to {VERSION}")
    while version < VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise WorkflowError(f"workflow format version {version} is no longer supported "
                                f"(current version is {VERSION})")
        doc = step(copy.deepcopy(doc))
        version = doc["version"]
    return doc


def check_depth(doc: Any, max_depth: int) -> None:
    """A WorkflowError naming the limit when decoded JSON ``doc`` is nested deeper than ``max_depth`` levels."""
    # Iterative, so a hostile document cannot exhaust the interpreter's stack.
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise WorkflowError(f"the document is nested deeper than {max_depth} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


_check_depth = check_depth  # the name comfy_format imports


def _id_order(node_id: str) -> tuple:
    # isdigit() alone is also true of digits int() does not read ("²"), and int() refuses thousands of digits
    return (0, int(node_id), "") if node_id.isascii() and node_id.isdigit() and len(node_id) < 100 else (1, 0, node_id)
