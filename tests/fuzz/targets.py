"""What the fuzz tests throw and where: hypothesis strategies for malformed and hostile workflow documents (ours and
ComfyUI's two formats), and the targets that must answer each with a structured refusal or a plan, never with any
other exception. ``benchmarks/reliability.py`` runs the same targets.

A target takes one generated case and raises ``Unexpected`` (or anything at all) when the answer is not one of the
expected ones; hypothesis then shrinks the case to the smallest that does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

import nodegraph as ng
from nodegraph import cli
from nodegraph.assets import workflows_dir
from nodegraph.comfy_format import load_document
from nodegraph.library import load_library
from nodegraph.validate import ValidationFailed
from nodegraph.workflow import WorkflowError


# Validation error codes about one input: each must name its node and the input.
INPUT_CODES = {"wrong_type", "out_of_range", "off_step", "not_an_option", "unsafe_path", "missing_input",
               "unknown_input", "missing_link_source", "missing_link_output", "type_mismatch", "expects_link"}


class Unexpected(AssertionError):
    """A target answered a case in a way no caller can rely on."""


# --- the pieces of a hostile document --------------------------------------------------------------------------------

REGISTRY = ng.build_registry()
# Seeds for mutation: the shipped examples that validate with empty model folders (they use the embedded demo
# model), so that small changes to them reach every stage, plans included.
EXAMPLES = [json.loads((workflows_dir() / f"{name}.json").read_text()) for name in
            ("text-to-image", "image-to-image", "inpainting", "teacher-ddim")]
COMFY_TYPES = ["KSampler", "CheckpointLoaderSimple", "EmptyLatentImage", "CLIPTextEncode", "VAEDecode", "SaveImage",
               "LoadImage", "PreviewImage", "LoraLoader", "PrimitiveNode", "Reroute", "Note", "KSamplerAdvanced",
               "VAEEncodeForInpaint", "ControlNetApply", "NoSuchNode"]
HOSTILE_TEXT = ["../../etc/passwd", "/etc/passwd", "C:\\Windows", "%2e%2e%2f", "\u2025/x", "\uff0e\uff0e\uff0fx",
                "a\x00b", "<script>alert(1)</script>", "\u202e\u0000\ud7ff", "²", "9" * 120, "", " ", "NaN",
                "__proto__", "constructor", "link", "format"]
HOSTILE_NUMBERS = [0, -1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30), 10**400, -(10**4000), 1e308, -1e308, 5e-324,
                   0.1, -0.0, 1e-7, True, False]
NON_JSON_NUMBERS = [float("nan"), float("inf"), float("-inf")]  # only in the cases that ask for them (see _text)

texts = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=24),
                  st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Nd", "No", "Po"]), max_size=8))
numbers = st.one_of(st.sampled_from(HOSTILE_NUMBERS), st.integers(), st.floats(allow_nan=False, allow_infinity=False))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(texts, inner, max_size=4)),
                           max_leaves=12)
node_ids = st.one_of(st.integers(1, 12).map(str), st.sampled_from(["a", "²", "1:2", "01", "9" * 5000, "", "-1"]),
                     texts)


def _link(ids: list[str]) -> st.SearchStrategy:
    outputs = st.one_of(st.sampled_from(["value", "image", "latent", "model", "clip", "vae", "mask", "nope"]), texts)
    return st.builds(lambda n, o: {"link": [n, o]}, st.one_of(st.sampled_from(ids), node_ids), outputs)


@st.composite
def our_documents(draw, registry: ng.Registry = REGISTRY) -> Any:
    """Our format, mostly well-formed enough to reach validation: real node types with their real input names,
    literals of every type (huge, negative, NaN, hostile text), links to nodes and outputs that may not exist
    (cycles included), with the occasional broken envelope."""
    ids = draw(st.lists(node_ids, min_size=0, max_size=8, unique=True))
    nodes: dict[str, Any] = {}
    for nid in ids:
        type_name = draw(st.one_of(st.sampled_from(sorted(t.name for t in registry)), texts))
        node_type = registry.get(type_name)
        names = list(node_type.inputs) if node_type is not None else []
        chosen = draw(st.lists(st.one_of(st.sampled_from(names), texts) if names else texts, max_size=6))
        value = st.one_of(json_values, _link(ids or ["1"]), st.sampled_from(HOSTILE_TEXT))
        entry: dict[str, Any] = {"type": type_name, "inputs": {n: draw(value) for n in chosen}}
        if draw(st.booleans()):
            entry["ui"] = draw(st.one_of(st.dictionaries(texts, json_values, max_size=3), json_values))
        if draw(st.integers(0, 9)) == 9:
            entry["version"] = draw(json_values)
        nodes[nid] = draw(st.one_of(st.just(entry), json_values)) if draw(st.integers(0, 15)) == 15 else entry
    doc: dict[str, Any] = {"format": "nodegraph/workflow", "version": 1, "nodes": nodes}
    for key, kind in (("groups", list), ("notes", list), ("meta", dict), ("outputs", list)):
        if draw(st.integers(0, 3)) == 3:
            value = draw(st.one_of(json_values, st.lists(st.one_of(st.sampled_from(ids or ["1"]), texts))))
            doc[key] = value if isinstance(value, kind) or draw(st.integers(0, 3)) == 3 else kind()
    if draw(st.integers(0, 15)) == 15:
        key = draw(st.sampled_from(["format", "version", "nodes", "extra"]))
        doc[key] = draw(json_values)
    return doc


@st.composite
def comfy_api_documents(draw) -> Any:
    ids = draw(st.lists(st.one_of(st.integers(1, 9).map(str), node_ids), min_size=1, max_size=6, unique=True))
    link = st.builds(lambda n, i: [n, i], st.one_of(st.sampled_from(ids), node_ids, st.integers()),
                     st.one_of(st.integers(-2, 3), numbers))
    names = st.one_of(st.sampled_from(["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise", "model",
                                       "positive", "negative", "latent_image", "ckpt_name", "text", "clip", "width",
                                       "height", "batch_size", "samples", "vae", "images", "filename_prefix",
                                       "image", "lora_name", "strength_model"]), texts)
    doc = {}
    for nid in ids:
        inputs = draw(st.dictionaries(names, st.one_of(json_values, link), max_size=6))
        doc[nid] = {"class_type": draw(st.one_of(st.sampled_from(COMFY_TYPES), texts)), "inputs": inputs}
        if draw(st.integers(0, 29)) == 29:
            doc[nid] = draw(json_values)
    return doc


@st.composite
def comfy_ui_documents(draw) -> Any:
    count = draw(st.integers(0, 6))
    ids = list(range(1, count + 1))
    slot = st.fixed_dictionaries({"name": texts, "type": st.sampled_from(["MODEL", "LATENT", "INT", "*", "IMAGE"]),
                                  "link": st.one_of(st.none(), st.integers(-1, 12))})
    nodes = []
    for nid in ids:
        node = {"id": draw(st.one_of(st.just(nid), json_values)),
                "type": draw(st.one_of(st.sampled_from(COMFY_TYPES), texts)),
                "inputs": draw(st.lists(slot, max_size=3)),
                "outputs": draw(st.lists(st.fixed_dictionaries({"name": texts, "type": texts,
                                                                "links": st.lists(st.integers(-1, 12), max_size=3)}),
                                         max_size=2)),
                "widgets_values": draw(st.one_of(st.lists(json_values, max_size=6), json_values)),
                "mode": draw(st.sampled_from([0, 2, 4, 0, "x"]))}
        nodes.append(node)
    small = st.integers(-1, count + 2)
    link = st.builds(lambda *parts: list(parts), st.integers(0, 12), small, st.integers(-1, 3), small,
                     st.integers(-1, 3), st.sampled_from(["MODEL", "LATENT", "INT", "*", "IMAGE"]))
    broken = st.lists(st.one_of(st.integers(-20, 12), texts), max_size=7)
    links = draw(st.lists(st.one_of(link, link, link, link, link, broken), max_size=8))
    doc: dict[str, Any] = {"nodes": nodes, "links": links, "version": 0.4}
    if draw(st.integers(0, 3)) == 3:
        doc["groups"] = draw(json_values)
    if draw(st.integers(0, 3)) == 3:
        doc["definitions"] = {"subgraphs": draw(st.lists(st.dictionaries(texts, json_values, max_size=4),
                                                         max_size=2))}
    return doc


@st.composite
def mutated(draw, bases: list[dict], registry: ng.Registry = REGISTRY) -> Any:
    """A valid workflow with a few hostile changes (none, at the simplest): an input set to a hostile value or
    relinked anywhere, a node removed or added, an editor title full of markup."""
    doc = copy.deepcopy(draw(st.sampled_from(bases)))
    nodes = doc["nodes"]
    for _ in range(draw(st.integers(0, 3))):
        ids = sorted(nodes) or ["1"]
        nid = draw(st.sampled_from(ids))
        action = draw(st.integers(0, 4))
        if nid not in nodes:
            continue
        node_type = registry.get(nodes[nid].get("type"))
        names = sorted(node_type.inputs) if node_type is not None else ["x"]
        if action == 0:
            value = st.one_of(st.sampled_from(HOSTILE_TEXT + HOSTILE_NUMBERS), json_values, _link(ids))
            nodes[nid].setdefault("inputs", {})[draw(st.one_of(st.sampled_from(names), texts))] = draw(value)
        elif action == 1:
            del nodes[nid]
        elif action == 2:
            nodes[draw(node_ids)] = {"type": draw(st.sampled_from(sorted(t.name for t in registry))), "inputs": {}}
        elif action == 3:
            nodes[nid]["ui"] = {"title": draw(st.sampled_from(HOSTILE_TEXT)), "pos": draw(json_values)}
        else:
            doc["outputs"] = draw(st.lists(st.one_of(st.sampled_from(ids), node_ids), max_size=3))
    return doc


def _text(doc: Any, nan: bool) -> str:
    text = json.dumps(doc)
    if nan and "0" in text:  # JSON that is not: NaN or Infinity where a number was
        return text.replace("0", json.dumps(NON_JSON_NUMBERS[len(text) % 3], allow_nan=True), 1)
    return text


@st.composite
def documents(draw, registry: ng.Registry = REGISTRY, bases: list[dict] | None = None) -> str:
    """The text of a document: a mutated valid workflow, a made-up one in any of the three formats, JSON with NaN
    or a bracket tower, or no JSON at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        depth = draw(st.sampled_from([63, 64, 65, 500, 5000, 100_000]))
        return "{\"format\": \"nodegraph/workflow\", \"version\": 1, \"nodes\": {}, \"meta\": " + "[" * depth \
            + "]" * depth * draw(st.sampled_from([0, 1])) + "}"
    if kind == 1:
        return draw(st.one_of(st.text(max_size=64), st.sampled_from(["", "[", "{\"format\":", "1" * 5000, "null"])))
    doc = draw(st.one_of(mutated(bases or EXAMPLES, registry), our_documents(registry), comfy_api_documents(),
                         comfy_ui_documents()))
    return _text(doc, nan=draw(st.integers(0, 9)) == 9)


def huge_documents() -> st.SearchStrategy:
    """Documents near the size and node-count limits: long chains (deep graphs), wide fan-outs."""
    def chain(n: int, reverse: bool) -> str:
        nodes = {"1": {"type": "Integer", "inputs": {"value": 1}}}
        for i in range(2, n + 1):
            source = str(n + 2 - i) if reverse else str(i - 1)
            nodes[str(i)] = {"type": "Integer", "inputs": {"value": {"link": [source, "value"]}}}
        return json.dumps({"format": "nodegraph/workflow", "version": 1, "nodes": nodes})

    def api_chain(n: int) -> str:
        doc = {str(i): {"class_type": "LatentUpscaleBy", "inputs": {"samples": [str(i + 1), 0],
                                                                    "upscale_method": "nearest-exact",
                                                                    "scale_by": 1.0}} for i in range(1, n)}
        doc[str(n)] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        return json.dumps(doc)

    def wide(n: int) -> str:
        nodes = {str(i): {"type": "Integer", "inputs": {"value": {"link": ["1", "value"]}}} for i in range(2, n + 1)}
        nodes["1"] = {"type": "Integer", "inputs": {"value": 1}}
        return json.dumps({"format": "nodegraph/workflow", "version": 1, "nodes": nodes})

    return st.one_of(st.builds(chain, st.integers(500, 3000), st.booleans()),
                     st.builds(api_chain, st.integers(500, 3000)),
                     st.builds(wide, st.sampled_from([5000, 10_000, 10_001])))


# --- the targets -----------------------------------------------------------------------------------------------------

class Validator:
    """``load_document`` (any format, with the real library's ComfyUI import) and validation against the real
    registry; nothing runs."""

    def __init__(self, root: Path):
        for name in ("models", "input", "output", "temp"):
            (root / name).mkdir(parents=True, exist_ok=True)
        self.settings = ng.Settings(models_dir=root / "models", input_dir=root / "input",
                                    output_dir=root / "output", temp_dir=root / "temp")
        self.library = load_library("nodes")

    def __call__(self, text: str) -> str:
        try:
            workflow, _ = load_document(text, self.library, self.settings)
        except WorkflowError as exc:
            _plain(str(exc))
            return "refused"
        try:  # as the CLI and the server do it (the executor remembers plans by the workflow's content)
            ng.Executor(REGISTRY, settings=self.settings).compile(workflow)
        except ValidationFailed as exc:
            for error in exc.errors:
                _plain(error.message)
                about_input = error.code in INPUT_CODES
                if not (error.node_id is None or isinstance(error.node_id, str)) or not error.code \
                        or (about_input and not (error.node_id is not None and isinstance(error.input, str))):
                    raise Unexpected(f"an error without its place or code: {error!r}") from None
            return "invalid"
        return "valid"


class Cli:
    """``nodegraph validate FILE`` in-process: exit status 0 or 2, and an ``error:`` line, never a traceback."""

    def __init__(self, root: Path):
        self.root = root
        self.validator = Validator(root)

    def __call__(self, text: str) -> str:
        path = self.root / "case.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        out, err = io.StringIO(), io.StringIO()
        folders = ["--models", str(self.root / "models"), "--input", str(self.root / "input")]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(["validate", str(path), *folders])
        if status == 0 and out.getvalue().startswith("ok:"):
            return "valid"
        if status == 2 and err.getvalue().startswith("error:") and "Traceback" not in err.getvalue():
            return "invalid" if err.getvalue().startswith("error: the workflow is invalid") else "refused"
        raise Unexpected(f"exit status {status}: {out.getvalue()[:200]!r} {err.getvalue()[:200]!r}")


def toy_documents() -> st.SearchStrategy:
    """``documents`` for the server's toy nodes, mutated from a small valid toy workflow."""
    from ..engine import toy

    base = {"format": "nodegraph/workflow", "version": 1, "nodes": {
        "1": {"type": "Const", "inputs": {"value": 2}},
        "2": {"type": "Add", "inputs": {"a": {"link": ["1", "value"]}, "b": 3}},
        "3": {"type": "Show", "inputs": {"value": {"link": ["2", "sum"]}}}}}
    return documents(toy.registry(), [base])


class Server:
    """``POST /prompt`` through aiohttp's test client, on a server over the toy nodes (a prompt that is accepted
    runs toy arithmetic only): 200 with a prompt id, or 400 with a JSON error (node errors with their input)."""

    def __init__(self, root: Path, registry: ng.Registry | None = None, library: Any = None):
        from aiohttp.test_utils import TestClient, TestServer

        from nodegraph.history import History
        from nodegraph.server import ServerConfig, create_app

        from ..engine import toy

        settings = ng.Settings(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                               temp_dir=root / "temp")
        app = create_app(ng.Executor(registry or toy.registry(), settings=settings), ServerConfig(),
                         History(root / "data" / "history.sqlite3"), library)
        self.loop = asyncio.new_event_loop()
        self.client = TestClient(TestServer(app), loop=self.loop)
        self.loop.run_until_complete(self.client.start_server())

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()

    def __call__(self, text: str) -> str:
        body = "{\"prompt\": " + text + "}" if text.strip().startswith(("{", "[")) else text
        return self.loop.run_until_complete(self._post(body.encode("utf-8", "surrogatepass")))

    async def _post(self, body: bytes) -> str:
        resp = await self.client.post("/prompt", data=body, headers={"Content-Type": "application/json"})
        text = await resp.text()
        try:
            answer = json.loads(text)
        except ValueError:
            raise Unexpected(f"{resp.status} with a body that is not JSON: {text[:200]!r}") from None
        if resp.status == 200 and isinstance(answer.get("prompt_id"), str):
            await self.client.post("/queue", json={"clear": True})
            return "valid"
        if resp.status != 400 or "error" not in answer:
            raise Unexpected(f"{resp.status}: {text[:300]}")
        for node_id, entry in answer.get("node_errors", {}).items():
            for error in entry["errors"]:
                _plain(error.get("message"))
                if error.get("type") in INPUT_CODES and not isinstance(error["extra_info"].get("input_name"), str):
                    raise Unexpected(f"node {node_id}: an error about an input that does not name it: {error}")
        error = answer["error"]  # text for a body that is no JSON, ComfyUI's object for a prompt it refuses
        return "invalid" if isinstance(error, dict) and error.get("type") == "prompt_outputs_failed_validation" \
            else "refused"


class Importer(Server):
    """``POST /nodegraph/import`` on a server over the real node library (import runs nothing): 200 with a workflow
    in our format that reads back (strict JSON: no NaN), or 400 with a JSON error."""

    def __init__(self, root: Path):
        super().__init__(root, REGISTRY, load_library("nodes"))

    def __call__(self, text: str) -> str:
        return self.loop.run_until_complete(self._import(text.encode("utf-8", "surrogatepass")))

    async def _import(self, body: bytes) -> str:
        resp = await self.client.post("/nodegraph/import", data=body, headers={"Content-Type": "application/json"})
        text = await resp.text()
        try:
            answer = ng.workflow.parse_json(text)
        except WorkflowError as exc:
            raise Unexpected(f"{resp.status} with a body that is not strict JSON: {exc}; {text[:200]!r}") from None
        if resp.status == 200:
            try:
                ng.workflow.from_json(answer)
            except WorkflowError as exc:
                raise Unexpected(f"the imported workflow does not read back: {exc}") from None
            return "valid"
        if resp.status != 400 or "error" not in answer:
            raise Unexpected(f"{resp.status}: {text[:300]}")
        return "refused"


def _plain(message: str) -> None:
    if not isinstance(message, str) or not message or "Traceback" in message:
        raise Unexpected(f"an unhelpful message: {message!r}")


@contextlib.contextmanager
def targets():
    """The targets by name, over fresh temporary folders."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server, importer = Server(root / "server"), Importer(root / "import")
        try:
            yield {"validator": Validator(root / "validator"), "cli": Cli(root / "cli"), "server": server,
                   "import": importer}
        finally:
            server.close()
            importer.close()
