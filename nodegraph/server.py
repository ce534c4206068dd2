"""The HTTP server: the browser canvas, a ComfyUI-compatible API and a websocket of run events.

Handlers are thin adapters: they parse the request, call the queue, the executor or the history, and serialise
the answer. Prompts run one at a time, in order, on a worker thread, so the event loop never blocks; run events
cross back to the loop with ``call_soon_threadsafe`` and go to the websocket of the client that queued the prompt.

Security by default: the server binds to loopback; requests must name an allowed Host (which defeats DNS
rebinding); state-changing requests and websockets from other sites are refused (Origin, Sec-Fetch-Site); a bearer
token is required when bound to any other address; file routes confine names to their folder.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import io
import ipaddress
import json
import logging
import mimetypes
import os
import platform
import secrets
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aiohttp import WSMsgType, web

from . import events as ev
from .assets import shipped_workflows, web_dir, workflows_dir
from .executor import Executor
from .folders import FILE_FOLDERS, Folder
from .history import History
from .library import Library, NoLibrary, model_folders
from .paths import UnsafePath, safe_join
from .settings import Settings
from .validate import ValidationFailed
from .workflow import Workflow, WorkflowError, from_json

log = logging.getLogger("nodegraph.server")

MAX_UPLOAD = 32 * 1024 * 1024
PREVIEW_PNG = struct.pack(">II", 1, 2)  # binary websocket frame header: preview image, PNG
IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff"}


def _file_folder(kind: str) -> Folder:
    """The folder a file route's ``type`` names; every file route is confined to one of these."""
    folder = FILE_FOLDERS.get(kind)
    if folder is None:
        raise web.HTTPBadRequest(text=f"type must be input, output or temp, not {kind!r}")
    return folder


@dataclass
class QueueItem:
    number: int
    prompt_id: str
    workflow: Workflow
    document: dict
    client_id: str | None
    extra: dict
    outputs: list[str]
    plan: Any = None

    def as_row(self) -> list:
        return [self.number, self.prompt_id, self.document, {**self.extra, "client_id": self.client_id},
                self.outputs]


class PromptQueue:
    """Prompts waiting to run, the one running, and the worker thread that runs them in order."""

    def __init__(self, executor: Executor, history: History, notify: Callable[[str, dict, str | None], None]):
        self.executor = executor
        self.history = history
        self.notify = notify
        self._pending: list[QueueItem] = []
        self.running: QueueItem | None = None
        self._cond = threading.Condition()
        self._counter = 0
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="nodegraph-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self.running is not None:
            self.executor.cancel(self.running.prompt_id)
        self._thread.join(timeout=10)

    @property
    def remaining(self) -> int:
        with self._cond:
            return len(self._pending) + (self.running is not None)

    def put(self, workflow: Workflow, document: dict, plan, client_id: str | None, extra: dict,
            front: bool = False) -> QueueItem:
        with self._cond:
            self._counter += 1
            item = QueueItem(self._counter, str(uuid.uuid4()), workflow, document, client_id, extra, plan.targets,
                             plan)
            if front:
                self._pending.insert(0, item)
            else:
                self._pending.append(item)
            self._cond.notify()
        self._status()
        return item

    def snapshot(self) -> dict:
        with self._cond:
            return {"queue_running": [self.running.as_row()] if self.running else [],
                    "queue_pending": [i.as_row() for i in self._pending]}

    def delete(self, prompt_ids: list[str]) -> int:
        with self._cond:
            before = len(self._pending)
            self._pending = [i for i in self._pending if i.prompt_id not in set(prompt_ids)]
            removed = before - len(self._pending)
        if removed:
            self._status()
        return removed

    def clear(self) -> None:
        with self._cond:
            self._pending.clear()
        self._status()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        running = self.running
        if running is None or (prompt_id is not None and prompt_id != running.prompt_id):
            return False
        return self.executor.cancel(running.prompt_id)

    def _status(self) -> None:
        self.notify("status", {"status": {"exec_info": {"queue_remaining": self.remaining}}}, None)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                item = self.running = self._pending.pop(0)
            try:
                self._run(item)
            except Exception:  # the queue must keep going whatever one prompt does
                log.exception("prompt %s crashed the worker", item.prompt_id)
            finally:
                with self._cond:
                    self.running = None
                self._status()

    def _run(self, item: QueueItem) -> None:
        messages: list = []
        started = time.time()
        outputs: dict[str, dict] = {}

        def on_event(event: ev.Event) -> None:
            if event.run_id != item.prompt_id:
                return
            for kind, data in _translate(event, item):
                if kind != "binary":
                    messages.append([kind, data])
                    if kind == "executed":
                        outputs[data["node"]] = data["output"]
                self.notify(kind, data, item.client_id)

        unsubscribe = self.executor.events.subscribe(on_event)
        try:
            result = self.executor.run(item.plan, run_id=item.prompt_id)
            status = {"success": "success", "failed": "error", "cancelled": "interrupted"}[result.status]
        except Exception as exc:
            log.exception("prompt %s failed outside any node", item.prompt_id)
            status = "error"
            self.notify("execution_error", {"prompt_id": item.prompt_id, "exception_message": str(exc),
                                            "exception_type": type(exc).__name__}, item.client_id)
        finally:
            unsubscribe()
        self.history.add(item.prompt_id, item.number, {
            "prompt": item.as_row(), "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success", "messages": messages},
            "meta": {"started": started, "finished": time.time()}})


def _translate(event: ev.Event, item: QueueItem) -> list[tuple[str, Any]]:
    """Engine events as ComfyUI websocket messages."""
    pid, now = item.prompt_id, int(time.time() * 1000)
    data = event.data
    if event.type == ev.RUN_STARTED:
        return [("execution_start", {"prompt_id": pid, "timestamp": now})]
    if event.type == ev.NODE_CACHED:
        out = [("execution_cached", {"nodes": [event.node_id], "prompt_id": pid, "timestamp": now})]
        if data.get("ui"):
            out.append(("executed", {"node": event.node_id, "display_node": event.node_id, "output": data["ui"],
                                     "prompt_id": pid}))
        return out
    if event.type == ev.NODE_STARTED:
        return [("executing", {"node": event.node_id, "display_node": event.node_id, "prompt_id": pid})]
    if event.type == ev.NODE_PROGRESS:
        out = [("progress", {"value": data["value"], "max": data["max"], "prompt_id": pid, "node": event.node_id})]
        preview = data.get("preview")
        if preview is not None and hasattr(preview, "save"):
            buffer = io.BytesIO()
            preview.save(buffer, format="PNG")
            out.append(("binary", PREVIEW_PNG + buffer.getvalue()))
        return out
    if event.type == ev.NODE_FINISHED and data.get("ui"):
        return [("executed", {"node": event.node_id, "display_node": event.node_id, "output": data["ui"],
                              "prompt_id": pid})]
    if event.type == ev.NODE_FAILED:
        return [("execution_error", {"prompt_id": pid, "node_id": event.node_id, "node_type": data["type"],
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


class Hub:
    """The open websockets by client id; messages are sent from the event loop."""

    def __init__(self) -> None:
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def send_threadsafe(self, kind: str, data: Any, client_id: str | None) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.send(kind, data, client_id)))

    async def send(self, kind: str, data: Any, client_id: str | None) -> None:
        if client_id is not None and kind != "status":
            targets = [self.sockets[client_id]] if client_id in self.sockets else []
        else:
            targets = list(self.sockets.values())
        for ws in targets:
            try:
                if kind == "binary":
                    await ws.send_bytes(data)
                else:
                    await ws.send_json({"type": kind, "data": data})
            except (ConnectionError, RuntimeError):
                pass  # the client went away; its socket is dropped when its handler ends


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8188
    token: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_upload: int = MAX_UPLOAD
    previews: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def loopback(self) -> bool:
        return _is_loopback(self.host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(executor: Executor, config: ServerConfig, history: History,
               library: Library | None = None) -> web.Application:
    """Build the aiohttp application (tests use it with aiohttp's test client). Its folders are the executor's
    settings' folders: what a client uploads is what LoadImage reads."""
    hub = Hub()
    queue = PromptQueue(executor, history, hub.send_threadsafe)
    if config.previews:
        executor.settings = executor.settings.replace(previews=True)
    app = web.Application(client_max_size=config.max_upload,
                          middlewares=[_security_middleware(config), _error_middleware])
    app["queue"], app["hub"], app["executor"], app["history"] = queue, hub, executor, history
    app["library"], app["config"] = library if library is not None else NoLibrary(), config

    async def on_startup(app: web.Application) -> None:
        hub.loop = asyncio.get_running_loop()
        queue.start()

    async def on_shutdown(app: web.Application) -> None:
        for ws in list(hub.sockets.values()):
            await ws.close()

    async def on_cleanup(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, queue.stop)
        history.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)

    routes = [
        ("GET", "/ws", websocket),
        ("POST", "/prompt", post_prompt), ("GET", "/prompt", get_prompt),
        ("GET", "/queue", get_queue), ("POST", "/queue", post_queue),
        ("GET", "/history", get_history), ("GET", "/history/{prompt_id}", get_history_item),
        ("POST", "/history", post_history),
        ("GET", "/object_info", object_info), ("GET", "/object_info/{node_type}", object_info_one),
        ("GET", "/view", view), ("POST", "/upload/image", upload_image),
        ("POST", "/interrupt", interrupt), ("GET", "/system_stats", system_stats),
        ("GET", "/models", models_index), ("GET", "/models/{folder}", models_list), ("POST", "/free", free),
        ("GET", "/workflows", workflows_list), ("GET", "/workflows/{name}", workflows_get),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, "/api" + path, handler)
    app.router.add_get("/", index)
    static = web_dir()
    if static.is_dir():
        app.router.add_static("/web/", static, follow_symlinks=False, append_version=False)
    return app


# --- middlewares -----------------------------------------------------------------------------------------------------

def _security_middleware(config: ServerConfig):
    allowed = {"localhost", "127.0.0.1", "[::1]", "::1", config.host, *config.allowed_hosts}

    @web.middleware
    async def middleware(request: web.Request, handler):
        host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
        if host not in allowed:
            return web.json_response({"error": f"Host {request.host!r} is not allowed (start the server with "
                                               f"--allow-host to add it)"}, status=403)
        upgrading = request.headers.get("Upgrade", "").lower() == "websocket"
        if request.method not in ("GET", "HEAD", "OPTIONS") or upgrading:
            site = request.headers.get("Sec-Fetch-Site")
            if site is not None and site not in ("same-origin", "none"):
                return web.json_response({"error": "cross-site requests are refused"}, status=403)
            origin = request.headers.get("Origin")
            if origin is not None and not _same_origin(origin, request.host):
                return web.json_response({"error": f"requests from origin {origin!r} are refused"}, status=403)
        if config.token is not None and request.path not in ("/", "/favicon.ico") \
                and not request.path.startswith("/web/"):
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip() \
                or request.query.get("token", "")
            if not hmac.compare_digest(given.encode(), config.token.encode()):
                return web.json_response({"error": "a bearer token is required"}, status=401)
        response = await handler(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    return middleware


def _same_origin(origin: str, host: str) -> bool:
    if origin == "null":
        return False
    for scheme in ("http://", "https://"):
        if origin.startswith(scheme):
            return origin[len(scheme):].rstrip("/") == host
    return False


@web.middleware
async def _error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        return web.json_response({"error": exc.text or exc.reason}, status=exc.status)
    except UnsafePath as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error (see the server log)"}, status=500)


# --- handlers --------------------------------------------------------------------------------------------------------

async def _json_body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send JSON with Content-Type: application/json")
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="the body is not valid JSON") from None


async def index(request: web.Request) -> web.StreamResponse:
    page = web_dir() / "index.html"
    if not page.is_file():
        return web.Response(text="nodegraph server: the canvas is not installed; use the HTTP API.")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    hub: Hub = request.app["hub"]
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=1024 * 1024)
    await ws.prepare(request)
    client_id = request.query.get("clientId") or uuid.uuid4().hex
    previous = hub.sockets.get(client_id)
    hub.sockets[client_id] = ws
    try:
        await ws.send_json({"type": "status", "data": {
            "status": {"exec_info": {"queue_remaining": request.app["queue"].remaining}}, "sid": client_id}})
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
    finally:
        if hub.sockets.get(client_id) is ws:
            if previous is not None and not previous.closed:
                hub.sockets[client_id] = previous
            else:
                del hub.sockets[client_id]
    return ws


def _node_errors(errors) -> dict:
    out: dict[str, dict] = {}
    for e in errors:
        key = e.node_id if e.node_id is not None else ""
        entry = out.setdefault(key, {"errors": [], "dependent_outputs": [], "class_type": e.node_type})
        entry["errors"].append({"type": e.code, "message": e.message, "details": str(e),
                                "extra_info": {"input_name": e.input}})
    return out


async def post_prompt(request: web.Request) -> web.Response:
    body = await _json_body(request)
    if not isinstance(body, dict) or "prompt" not in body:
        return web.json_response({"error": {"type": "invalid_prompt", "message": "the body needs a \"prompt\"",
                                            "details": "", "extra_info": {}}, "node_errors": {}}, status=400)
    executor: Executor = request.app["executor"]
    try:
        workflow = from_json(body["prompt"])
        plan = executor.compile(workflow)
    except WorkflowError as exc:
        return web.json_response({"error": {"type": "invalid_prompt", "message": str(exc), "details": "",
                                            "extra_info": {}}, "node_errors": {}}, status=400)
    except ValidationFailed as exc:
        general = [e for e in exc.errors if e.node_id is None]
        message = general[0].message if general else f"{len(exc.errors)} input(s) failed validation"
        return web.json_response({"error": {"type": "prompt_outputs_failed_validation", "message": message,
                                            "details": str(exc), "extra_info": {}},
                                  "node_errors": _node_errors(exc.errors)}, status=400)
    extra = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
    client_id = body.get("client_id") if isinstance(body.get("client_id"), str) else None
    item = request.app["queue"].put(workflow, body["prompt"], plan, client_id, extra, front=bool(body.get("front")))
    return web.json_response({"prompt_id": item.prompt_id, "number": item.number, "node_errors": {}})


async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response({"exec_info": {"queue_remaining": request.app["queue"].remaining}})


async def get_queue(request: web.Request) -> web.Response:
    return web.json_response(request.app["queue"].snapshot())


async def _clear_or_delete(request: web.Request, target) -> web.Response:
    """``{"clear": true}`` and/or ``{"delete": [ids]}`` on the queue or the history, as ComfyUI takes them."""
    body = await _json_body(request)
    if isinstance(body, dict) and body.get("clear"):
        target.clear()
    if isinstance(body, dict) and isinstance(body.get("delete"), list):
        target.delete([str(i) for i in body["delete"]])
    return web.json_response({})


async def post_queue(request: web.Request) -> web.Response:
    return await _clear_or_delete(request, request.app["queue"])


def _int_query(request: web.Request, name: str, default: int, lo: int = 0, hi: int = 10**6) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return max(lo, min(hi, int(raw)))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a whole number") from None


async def get_history(request: web.Request) -> web.Response:
    history: History = request.app["history"]
    limit = _int_query(request, "max_items", 200, 1, 10_000)
    offset = _int_query(request, "offset", 0)
    return web.json_response(history.page(limit, offset))


async def get_history_item(request: web.Request) -> web.Response:
    item = request.app["history"].get(request.match_info["prompt_id"])
    return web.json_response({request.match_info["prompt_id"]: item} if item else {})


async def post_history(request: web.Request) -> web.Response:
    return await _clear_or_delete(request, request.app["history"])


def _comfy_input(spec: dict) -> list:
    """One input in ComfyUI's object_info shape: [TYPE or options, {settings}]."""
    options = {k: v for k, v in spec.items() if k not in ("name", "kind", "type", "optional", "options")}
    if spec["kind"] == "COMBO":
        return [spec["options"], options]
    return [spec["type"], options]


def _object_info(node_type, settings: Settings) -> dict:
    doc = node_type.to_json(settings)
    required = {i["name"]: _comfy_input(i) for i in doc["inputs"] if not i["optional"]}
    optional = {i["name"]: _comfy_input(i) for i in doc["inputs"] if i["optional"]}
    return {
        "input": {"required": required, "optional": optional},
        "input_order": {"required": list(required), "optional": list(optional)},
        "output": [o["type"] for o in doc["outputs"]], "output_is_list": [False] * len(doc["outputs"]),
        "output_name": [o["name"] for o in doc["outputs"]], "name": doc["name"],
        "display_name": doc["display_name"], "description": doc["description"], "category": doc["category"],
        "output_node": doc["output_node"], "deprecated": doc["deprecated"],
        "python_module": node_type.__module__, "nodegraph": doc,
    }


async def object_info(request: web.Request) -> web.Response:
    registry = request.app["executor"].registry
    loop = asyncio.get_running_loop()
    # option lists may read folders: keep that off the event loop
    settings = _settings(request)
    info = await loop.run_in_executor(None, lambda: {t.name: _object_info(t, settings) for t in registry})
    return web.json_response(info)


async def object_info_one(request: web.Request) -> web.Response:
    node_type = request.app["executor"].registry.get(request.match_info["node_type"])
    if node_type is None:
        return web.json_response({})
    return web.json_response({node_type.name: _object_info(node_type, _settings(request))})


def _settings(request: web.Request) -> Settings:
    return request.app["executor"].settings


async def view(request: web.Request) -> web.StreamResponse:
    name = request.query.get("filename", "")
    subfolder = request.query.get("subfolder", "")
    folder = _file_folder(request.query.get("type", "output"))
    path = folder.path(_settings(request), f"{subfolder}/{name}" if subfolder else name)
    if not path.is_file():
        raise web.HTTPNotFound(text=f"no file {name!r} there")
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return web.FileResponse(path, headers={"Content-Type": kind, "Cache-Control": "no-cache",
                                           "Content-Disposition": f"inline; filename=\"{path.name}\""})


async def upload_image(request: web.Request) -> web.Response:
    if not request.content_type.startswith("multipart/"):
        raise web.HTTPUnsupportedMediaType(text="upload with multipart/form-data")
    form = await request.post()
    upload = form.get("image")
    if not isinstance(upload, web.FileField):
        raise web.HTTPBadRequest(text="the form needs an \"image\" file field")
    kind = str(form.get("type", "input"))
    subfolder = str(form.get("subfolder", ""))
    overwrite = str(form.get("overwrite", "")).lower() in ("1", "true", "yes")
    data = upload.file.read()
    _check_image(data, upload.content_type)
    name = Path(upload.filename or "upload.png").name
    target = _file_folder(kind).path(_settings(request), f"{subfolder}/{name}" if subfolder else name)
    if target.exists() and not overwrite:
        stem, suffix, n = target.stem, target.suffix, 1
        while target.exists():
            target = target.with_name(f"{stem} ({n}){suffix}")
            n += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)  # never a half-written file under the final name
    return web.json_response({"name": target.name, "subfolder": subfolder, "type": kind})


def _check_image(data: bytes, content_type: str | None) -> None:
    if content_type and content_type not in IMAGE_TYPES:
        raise web.HTTPUnsupportedMediaType(text=f"{content_type} is not an image type")
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception:
        raise web.HTTPUnsupportedMediaType(text="the file is not a readable image") from None


async def interrupt(request: web.Request) -> web.Response:
    prompt_id = None
    if request.can_read_body and request.content_type == "application/json":
        body = await _json_body(request)
        if isinstance(body, dict) and isinstance(body.get("prompt_id"), str):
            prompt_id = body["prompt_id"]
    return web.json_response({"interrupted": request.app["queue"].interrupt(prompt_id)})


async def system_stats(request: web.Request) -> web.Response:
    devices = request.app["library"].system_info(_settings(request))
    ram_total = ram_free = 0
    try:
        pages, free_pages = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
        ram_total, ram_free = pages * os.sysconf("SC_PAGE_SIZE"), free_pages * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    from . import __version__

    cache = request.app["executor"].cache.stats()
    return web.json_response({
        "system": {"os": platform.system().lower(), "python_version": sys.version.split()[0],
                   "nodegraph_version": __version__, "ram_total": ram_total, "ram_free": ram_free,
                   "embedded_python": False, "argv": []},
        "devices": devices, "cache": cache})


async def models_index(request: web.Request) -> web.Response:
    """The model folders the node types read (ComfyUI's folder names), whether or not they exist yet."""
    return web.json_response(list(model_folders(request.app["executor"].registry)))


async def models_list(request: web.Request) -> web.Response:
    folder = model_folders(request.app["executor"].registry).get(request.match_info["folder"])
    if folder is None:
        raise web.HTTPNotFound(text=f"no model folder {request.match_info['folder']!r}")
    names = await asyncio.get_running_loop().run_in_executor(None, folder.names, _settings(request))
    return web.json_response(names)


async def free(request: web.Request) -> web.Response:
    body = await _json_body(request) if request.can_read_body else {}
    executor: Executor = request.app["executor"]
    if not isinstance(body, dict) or body.get("unload_models") or body.get("free_memory") or not body:
        executor.cache.clear()
        request.app["library"].free()
        gc.collect()
    return web.json_response({})


async def workflows_list(request: web.Request) -> web.Response:
    return web.json_response(shipped_workflows())


async def workflows_get(request: web.Request) -> web.Response:
    path = safe_join(workflows_dir(), request.match_info["name"] + ".json")
    if not path.is_file():
        raise web.HTTPNotFound(text="no such example workflow")
    return web.Response(body=path.read_bytes(), content_type="application/json")


# --- running it ------------------------------------------------------------------------------------------------------

def serve(registry, settings: Settings, library: Library | None = None, *, host: str = "127.0.0.1",
          port: int = 8188, token: str | None = None, allowed_hosts: tuple[str, ...] = (),
          data_dir: str | Path = "data", cache=None) -> int:
    """Run the server until interrupted (``nodegraph serve``)."""
    for folder in FILE_FOLDERS.values():
        folder.root(settings).mkdir(parents=True, exist_ok=True)
    config = ServerConfig(host=host, port=port, token=token or os.environ.get("NODEGRAPH_TOKEN"),
                          allowed_hosts=allowed_hosts)
    if not config.loopback and not config.token:
        config.token = secrets.token_urlsafe(24)
        print(f"bound to {host}, which is not loopback: requests need the bearer token {config.token}")
    executor = Executor(registry, cache=cache, settings=settings)
    app = create_app(executor, config, History(Path(data_dir) / "history.sqlite3"), library)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"nodegraph: open http://{shown}:{port}/" + (f"#token={config.token}" if config.token else ""),
          flush=True)
    web.run_app(app, host=host, port=port, print=None, access_log=None)
    return 0
