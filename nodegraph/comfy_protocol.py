"""ComfyUI's protocol: engine events as the websocket messages ComfyUI clients read, the JSON shapes of its HTTP
answers (``/object_info``, a refused prompt's ``node_errors``), and the hub of open websockets.

A run's events become JSON messages ``{"type": ..., "data": ...}`` (``execution_start``, ``executing``,
``progress``, ``executed``, ``execution_cached``, ``node_skipped``, ``execution_error``, ``execution_success``,
``execution_interrupted``; ``status`` for the queue) and preview images. Previews go to the sockets whose client
sent its feature flags (ComfyUI's frontend and our canvas do, as soon as the socket opens), framed as it asked: with
``{"type": "feature_flags", "data": {"supports_preview_metadata": true}}`` PREVIEW_IMAGE_WITH_METADATA frames (type
4: JSON naming the node and the prompt, then the PNG), else PREVIEW_IMAGE frames (type 1: PNG). A script that sent
no flags hears no binary frames, as from a ComfyUI started without ``--preview-method``: several API clients take
every binary frame for an output image. Anything else a client sends is ignored: a malformed message never closes a
socket. Each socket's messages go out in the order they were handed over.

What a ``/prompt`` body may say is ``PromptRequest``; ``ClientIds`` reports the nodes of an imported ComfyUI prompt
under the ids its client sent.

Translation is a pure function (an event in, messages out) that runs on the worker thread, which also encodes the
preview PNG; the hub sends on the event loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from . import events as ev
from .comfy_format import UnsupportedWorkflow
from .validate import ValidationFailed
from .workflow import WorkflowError

log = logging.getLogger("nodegraph.comfy_protocol")

Message = tuple[str, Any]

# binary websocket frames: a big-endian uint32 event type first
PREVIEW_IMAGE = 1  # then a uint32 image format (2: PNG) and the image
PREVIEW_IMAGE_WITH_METADATA = 4  # then a uint32 length N, N bytes of JSON metadata and the image
PNG = 2
PREVIEW = "preview"  # the type of the message that carries a ``Preview``


@dataclass(frozen=True)
class Preview:
    """A preview image of a running node, encoded once; each socket gets it framed as its client asked."""

    png: bytes
    node_id: str
    prompt_id: str

    def frame(self, features: dict) -> bytes:
        if features.get("supports_preview_metadata") is True:
            meta = json.dumps({"node_id": self.node_id, "display_node_id": self.node_id,
                               "prompt_id": self.prompt_id, "image_type": "image/png"}).encode()
            return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + self.png
        return struct.pack(">II", PREVIEW_IMAGE, PNG) + self.png


# --- engine events -> messages ---------------------------------------------------------------------------------------

def translate(event: ev.Event, prompt_id: str) -> list[Message]:
    """The messages a ComfyUI client expects for one engine event of prompt ``prompt_id``."""
    pid, node, now, data = prompt_id, event.node_id, int(time.time() * 1000), event.data
    if event.type == ev.RUN_STARTED:
        return [("execution_start", {"prompt_id": pid, "timestamp": now})]
    if event.type == ev.NODE_CACHED:
        out: list[Message] = [("execution_cached", {"nodes": [node], "prompt_id": pid, "timestamp": now})]
        if data.get("ui"):
            out.append(_executed(node, data["ui"], pid))
        return out
    if event.type == ev.NODE_STARTED:
        return [("executing", {"node": node, "display_node": node, "prompt_id": pid})]
    if event.type == ev.NODE_PROGRESS:
        out = [("progress", {"value": data["value"], "max": data["max"], "prompt_id": pid, "node": node})]
        preview = data.get("preview")
        if preview is not None and hasattr(preview, "save"):  # a PIL image
            buffer = io.BytesIO()
            preview.save(buffer, format="PNG")
            out.append((PREVIEW, Preview(buffer.getvalue(), node, pid)))
        return out
    if event.type == ev.NODE_FINISHED and data.get("ui"):
        return [_executed(node, data["ui"], pid)]
    if event.type == ev.NODE_SKIPPED:
        return [("node_skipped", {"node": node, "because_of": data.get("because_of"), "prompt_id": pid})]
    if event.type == ev.NODE_FAILED:
        return [("execution_error", {"prompt_id": pid, "node_id": node, "node_type": data["type"],
                                     "exception_message": data["message"], "exception_type": data["exception_type"],
                                     "traceback": data["traceback"].splitlines(), "timestamp": now})]
    if event.type == ev.RUN_FINISHED:
        out = [("executing", {"node": None, "prompt_id": pid})]
        if data["status"] == "success":
            out.append(("execution_success", {"prompt_id": pid, "timestamp": now}))
        elif data["status"] == "cancelled":
            out.append(("execution_interrupted", {"prompt_id": pid, "timestamp": now}))
        return out
    return []


def _executed(node: str | None, ui: dict, pid: str) -> Message:
    return ("executed", {"node": node, "display_node": node, "output": ui, "prompt_id": pid})


def crashed(prompt_id: str, exc: BaseException) -> Message:
    """A run that failed outside any node (the executor itself raised)."""
    return ("execution_error", {"prompt_id": prompt_id, "exception_message": str(exc),
                                "exception_type": type(exc).__name__})


def status(remaining: int, sid: str | None = None) -> Message:
    data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": remaining}}}
    if sid is not None:
        data["sid"] = sid
    return ("status", data)


def recorded(message: Message) -> bool:
    """Whether a message belongs in the history entry's ``messages`` (previews do not)."""
    return message[0] != PREVIEW


# --- HTTP answers ----------------------------------------------------------------------------------------------------

def object_info(node_type, settings) -> dict:
    """One node type in ``/object_info``'s shape, with our own declaration under ``"nodegraph"``."""
    doc = node_type.to_json(settings)
    required = {i["name"]: _input(i) for i in doc["inputs"] if not i["optional"]}
    optional = {i["name"]: _input(i) for i in doc["inputs"] if i["optional"]}
    return {
        "input": {"required": required, "optional": optional},
        "input_order": {"required": list(required), "optional": list(optional)},
        "output": [o["type"] for o in doc["outputs"]], "output_is_list": [False] * len(doc["outputs"]),
        "output_name": [o["name"] for o in doc["outputs"]], "name": doc["name"],
        "display_name": doc["display_name"], "description": doc["description"], "category": doc["category"],
        "output_node": doc["output_node"], "deprecated": doc["deprecated"],
        "python_module": node_type.__module__, "nodegraph": doc,
    }


def _input(spec: dict) -> list:
    """One input: [TYPE or options, {settings}]."""
    options = {k: v for k, v in spec.items() if k not in ("name", "kind", "type", "optional", "options")}
    if spec["kind"] == "COMBO":
        return [spec["options"], options]
    return [spec["type"], options]


def prompt_refused(problem: str | WorkflowError | ValidationFailed, report: "ClientIds | None" = None) -> dict:
    """The answer to a ``/prompt`` that cannot be queued: a malformed body or workflow, or one that fails import
    (every unsupported node type or value, by the client's node id) or validation (every error, by node: under the
    client's ids when ``report`` gives them)."""
    if isinstance(problem, UnsupportedWorkflow):
        out: dict[str, dict] = {}
        for p in problem.problems:
            entry = out.setdefault(str(p.node_id), {"errors": [], "dependent_outputs": [],
                                                    "class_type": p.class_type})
            entry["errors"].append({"type": "unsupported", "message": p.message, "details": str(p),
                                    "extra_info": {"input_name": p.input} if p.input else {}})
        return {"error": {"type": "invalid_prompt", "message": str(problem), "details": "", "extra_info": {}},
                "node_errors": out}
    if not isinstance(problem, ValidationFailed):
        return {"error": {"type": "invalid_prompt", "message": str(problem), "details": "", "extra_info": {}},
                "node_errors": {}}
    general = [e for e in problem.errors if e.node_id is None]
    message = general[0].message if general else f"{len(problem.errors)} input(s) failed validation"
    return {"error": {"type": "prompt_outputs_failed_validation", "message": message, "details": str(problem),
                      "extra_info": {}}, "node_errors": node_errors(problem.errors, report)}


def node_errors(errors, report: "ClientIds | None" = None) -> dict:
    """Validation errors by node id, as ``/prompt`` answers them."""
    out: dict[str, dict] = {}
    for e in errors:
        key = e.node_id if e.node_id is not None else ""
        node_type = e.node_type
        if report is not None and key:
            key = report(key) or ""
            node_type = report.class_type(key, node_type)
        entry = out.setdefault(key, {"errors": [], "dependent_outputs": [], "class_type": node_type})
        entry["errors"].append({"type": e.code, "message": e.message, "details": str(e),
                                "extra_info": {"input_name": e.input}})
    return out


# --- what a /prompt body says ----------------------------------------------------------------------------------------

class PromptRequestError(ValueError):
    """A ``/prompt`` body that cannot be queued as it is; the message says why."""


@dataclass
class PromptRequest:
    """A ``/prompt`` body, read as ComfyUI reads it; top-level keys it does not know are ignored.

    ``extra`` is ``extra_data`` (kept with the prompt in the queue and the history; ``extra_pnginfo`` travels with
    the workflow into the files it writes); ``front`` queues it before everything waiting; ``number`` is its place in
    the queue (lower runs first, ComfyUI's priority); ``targets`` (``partial_execution_targets``) are the only output
    nodes to run; ``prompt_id`` is the id the client chose for it."""

    document: Any
    client_id: str | None = None
    extra: dict = field(default_factory=dict)
    front: bool = False
    number: float | None = None
    targets: list[str] | None = None
    prompt_id: str | None = None

    @classmethod
    def parse(cls, body: Any) -> "PromptRequest":
        if not isinstance(body, dict) or "prompt" not in body:
            raise PromptRequestError("the body needs a \"prompt\"")
        extra = dict(body["extra_data"]) if isinstance(body.get("extra_data"), dict) else {}
        client_id = body.get("client_id", extra.get("client_id"))
        number = body.get("number")
        if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))):
            raise PromptRequestError(f"\"number\" must be a number, not {number!r}")
        targets = body.get("partial_execution_targets")
        if targets is not None:
            if not isinstance(targets, list) or not all(isinstance(t, (str, int)) and not isinstance(t, bool)
                                                        for t in targets):
                raise PromptRequestError("\"partial_execution_targets\" must list node ids")
            targets = [str(t) for t in targets]
        prompt_id = body.get("prompt_id")
        if prompt_id is not None and (not isinstance(prompt_id, str) or not 0 < len(prompt_id) <= 128
                                      or not prompt_id.isprintable()):
            raise PromptRequestError("\"prompt_id\" must be a short printable string")
        return cls(body["prompt"], client_id if isinstance(client_id, str) else None, extra,
                   bool(body.get("front")), number, targets, prompt_id)


@dataclass(frozen=True)
class ClientIds:
    """The nodes a client sent (id -> its class_type): a node of ours is reported under its own id when the client
    sent it, else under the id of the client's node it was imported from (the importer names the nodes it adds
    "<client id>:<suffix>"), else not at all."""

    types: dict

    def __call__(self, node_id: str | None) -> str | None:
        while node_id is not None and node_id not in self.types:
            node_id = node_id.rpartition(":")[0] if ":" in node_id else None
        return node_id

    def class_type(self, node_id: str, ours: str | None) -> str | None:
        """The type the client knows the node ``node_id`` (one of its ids) by; ``ours`` when it sent none."""
        return self.types.get(node_id) or ours

    @classmethod
    def of(cls, document: Any, kind: str) -> "ClientIds | None":
        """The nodes of a document in ComfyUI's API (``comfy_api``) or UI (``comfy_ui``) format; None for ours."""
        if kind == "comfy_api" and isinstance(document, dict):
            return cls({str(k): v.get("class_type") if isinstance(v, dict) else None for k, v in document.items()})
        if kind == "comfy_ui" and isinstance(document, dict) and isinstance(document.get("nodes"), list):
            return cls({str(n["id"]): n.get("type") for n in document["nodes"] if isinstance(n, dict) and "id" in n})
        return None


# --- the websocket hub -----------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Client:
    """One open websocket and what its client said it understands (None: it never said)."""

    id: str
    ws: web.WebSocketResponse
    features: dict | None = None
    # One message at a time: a big message may be compressed off the loop, and the next must not overtake it.
    sending: asyncio.Lock = field(default_factory=asyncio.Lock)


class Hub:
    """The open websockets by client id. Messages may be handed over from any thread; they are sent from the loop.

    ``features``: what this server tells a client that sends its feature flags (ComfyUI answers the same way)."""

    def __init__(self, features: dict | None = None) -> None:
        self.clients: dict[str, Client] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.features = {"supports_preview_metadata": True, **(features or {})}

    def send_threadsafe(self, kind: str, data: Any, client_id: str | None) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: loop.create_task(self.send(kind, data, client_id)))

    async def send(self, kind: str, data: Any, client_id: str | None) -> None:
        """Send to ``client_id`` (status messages, and everything of a prompt queued without one, go to all)."""
        if client_id is not None and kind != "status":
            targets = [self.clients[client_id]] if client_id in self.clients else []
        else:
            targets = list(self.clients.values())
        for client in targets:
            await self._send(client, kind, data)

    async def _send(self, client: Client, kind: str, data: Any) -> None:
        if isinstance(data, Preview) and client.features is None:
            return  # a client that never sent its feature flags gets no binary frames (see the module's docstring)
        async with client.sending:
            try:
                if isinstance(data, Preview):
                    await client.ws.send_bytes(data.frame(client.features))
                else:
                    await client.ws.send_json({"type": kind, "data": data})
            except (ConnectionError, RuntimeError):
                pass  # the client went away; it is dropped when its socket's handler ends

    async def attend(self, ws: web.WebSocketResponse, client_id: str, hello: Message) -> None:
        """Serve one open socket until it closes: greet it, then read what its client sends."""
        client = Client(client_id, ws)
        previous = self.clients.get(client_id)
        self.clients[client_id] = client
        try:
            await self._send(client, *hello)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._receive(client, msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            if self.clients.get(client_id) is client:
                if previous is not None and not previous.ws.closed:
                    self.clients[client_id] = previous  # a reconnect that closed first: the older socket stays
                else:
                    del self.clients[client_id]

    async def _receive(self, client: Client, text: str) -> None:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            log.debug("client %s sent a message that is not JSON", client.id)
            return
        if not isinstance(message, dict) or message.get("type") != "feature_flags":
            return
        flags = message.get("data")
        if isinstance(flags, dict):
            client.features = dict(flags)
            await self._send(client, "feature_flags", self.features)

    async def close(self) -> None:
        for client in list(self.clients.values()):
            await client.ws.close()
