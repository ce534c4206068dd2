"""The HTTP server: the browser canvas, a ComfyUI-compatible API and a websocket of run events.

Handlers are thin adapters: they parse the request, call the queue, the executor or the history, and serialise
the answer. The run queue and its worker thread are ``prompt_queue``; what clients are told, and in which shape
(websocket messages, preview frames, ``/object_info``, refused prompts), is ``comfy_protocol``. Run events cross
back to the event loop with ``call_soon_threadsafe`` and go to the websocket of the client that queued the prompt.

Security by default: the server binds to loopback; requests must name an allowed Host (which defeats DNS
rebinding); state-changing requests and websockets from other sites are refused (Origin, Sec-Fetch-Site); a bearer
token is required when bound to any other address; file routes confine names to their folder; request bodies are
bounded as workflows are; every answer carries a Content-Security-Policy that lets only the canvas's own scripts run
and forbids framing.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import io
import ipaddress
import logging
import mimetypes
import os
import platform
import re
import secrets
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from . import comfy_protocol as comfy
from .assets import shipped_workflows, web_dir, workflows_dir
from .executor import Executor
from .folders import FILE_FOLDERS, Folder, folders_of
from .history import History
from .library import Library, NoLibrary
from .paths import UnsafePath, safe_join
from .prompt_queue import PromptQueue, Runner
from .settings import Settings
from .spec import file_name_problem
from .validate import ValidationFailed
from .workflow import Limits, Workflow, WorkflowError, check_depth, from_json, parse_json

log = logging.getLogger("nodegraph.server")

MAX_UPLOAD = 32 * 1024 * 1024
# A JSON body is nested no deeper than a workflow may be, with room for the envelope a workflow travels in
# ({"prompt": ..., "extra_data": {"extra_pnginfo": {"workflow": ...}}}); deeper bodies are refused before anything
# (the queue's store, the history) serialises them again.
BODY_DEPTH = Limits().max_depth + 4
# what an upload may be, by the format Pillow reads from its bytes, and the suffixes it may be stored under
IMAGE_FORMATS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "WEBP": (".webp",), "GIF": (".gif",), "BMP": (".bmp",),
                 "TIFF": (".tif", ".tiff"), "MPO": (".jpg", ".jpeg")}


def _file_folder(kind: str) -> Folder:
    """The folder a file route's ``type`` names; every file route is confined to one of these."""
    folder = FILE_FOLDERS.get(kind)
    if folder is None:
        raise web.HTTPBadRequest(text=f"type must be input, output or temp, not {kind!r}")
    return folder


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
               library: Library | None = None, runner: Runner | None = None) -> web.Application:
    """Build the aiohttp application (tests use it with aiohttp's test client). Its folders are the executor's
    settings' folders: what a client uploads is what LoadImage reads. Prompts run on ``runner`` when given (a
    ``nodegraph.cluster.DaskRunner``), else on the executor; the executor still validates them."""
    hub = comfy.Hub({"max_upload_size": config.max_upload})
    queue = PromptQueue(runner if runner is not None else executor, history, hub.send_threadsafe, comfy)
    if config.previews:
        executor.settings = executor.settings.replace(previews=True)
    app = web.Application(client_max_size=config.max_upload,
                          middlewares=[_security_middleware(config), _error_middleware])
    app["queue"], app["hub"], app["executor"], app["history"] = queue, hub, executor, history
    app["runner"] = runner
    app["library"], app["config"] = library if library is not None else NoLibrary(), config

    async def on_startup(app: web.Application) -> None:
        hub.loop = asyncio.get_running_loop()
        # what an earlier process accepted and did not finish: settled or queued again before anything new
        queue.restore(lambda document, targets, extra: _compile(app, document, targets, extra))
        queue.start()

    async def on_shutdown(app: web.Application) -> None:
        await hub.close()

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
        ("POST", "/nodegraph/import", import_document),
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
        return await handler(request)

    @web.middleware
    async def protected(request: web.Request, handler):
        try:
            response = await middleware(request, handler)
        except web.HTTPException as exc:  # redirects and JSON errors pass as exceptions: they are answers too
            _protect(exc.headers, request.host)
            raise
        _protect(response.headers, request.host)
        return response

    return protected


# What the browser may do with our pages: run only the canvas's own modules (no inline script, no eval), load images
# and media from here or from blobs the canvas made (previews), talk only to this server, and never be framed.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                           "media-src 'self' blob:; connect-src 'self'{sockets}; font-src 'self'; object-src 'none'; "
                           "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_PLAIN_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]+)?|\[[0-9A-Fa-f:.]+\](:[0-9]+)?")


def _protect(headers, host: str) -> None:
    """The browser protections every answer carries (pages, scripts, API responses and errors alike)."""
    # 'self' covers the websocket in CSP 3 browsers; older ones need it named. The Host is only echoed when it is
    # a plain host name: anything else could smuggle directives in.
    sockets = f" ws://{host} wss://{host}" if _PLAIN_HOST.fullmatch(host) else ""
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY.format(sockets=sockets))
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")


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
    """The body as JSON. A request without an ``Origin`` is read as JSON whatever its declared Content-Type, as
    ComfyUI reads it (scripts post JSON as text/plain or with no type at all). Browsers send an Origin with every
    cross-site POST, and the security middleware has refused those already; a page may only send a "simple" content
    type (a form, text) cross-site without a preflight, so insisting on application/json when an Origin is present
    keeps that door shut too."""
    if request.content_type != "application/json" and "Origin" in request.headers:
        raise web.HTTPUnsupportedMediaType(text="send JSON with Content-Type: application/json")
    try:
        body = parse_json(await request.read(), Limits(max_bytes=request.app["config"].max_upload,
                                                        max_depth=BODY_DEPTH))
        check_depth(body, BODY_DEPTH)
    except WorkflowError as exc:
        raise web.HTTPBadRequest(text=str(exc).replace("the document", "the body", 1)) from None
    return body


async def index(request: web.Request) -> web.StreamResponse:
    page = web_dir() / "index.html"
    if not page.is_file():
        return web.Response(text="nodegraph server: the canvas is not installed; use the HTTP API.")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=1024 * 1024)
    await ws.prepare(request)
    client_id = request.query.get("clientId") or uuid.uuid4().hex
    hello = comfy.status(request.app["queue"].remaining, sid=client_id)
    await request.app["hub"].attend(ws, client_id, hello)
    return ws


def _load_document(app: web.Application, document: Any) -> tuple[Workflow, "comfy.ClientIds | None"]:
    """A workflow from a document in our format or ComfyUI's (API or UI), and, for ComfyUI's, the client's names
    of its nodes. Raises WorkflowError or ValidationFailed (a ComfyUI document with unsupported nodes or values)."""
    if not isinstance(document, dict) or "format" in document:
        return from_json(document), None
    from .comfy_format import load_document

    workflow, kind = load_document(document, app["library"], app["executor"].settings)
    return workflow, comfy.ClientIds.of(document, kind)


def _compile(app: web.Application, document: Any, targets: list[str] | None, extra: dict):
    """A prompt's workflow, plan and client node names, as ``/prompt`` reads it and as a restart reads a stored one
    again. Raises WorkflowError or ValidationFailed (with ``report``: the client's names of the nodes)."""
    workflow, report = _load_document(app, document)
    try:
        plan = app["executor"].compile(workflow, targets)
    except ValidationFailed as exc:
        exc.report = report
        raise
    extra_pnginfo = extra.get("extra_pnginfo")
    if isinstance(extra_pnginfo, dict):
        # what ComfyUI writes into the PNGs a prompt saves: it travels with the workflow that output nodes embed
        workflow.meta = {**(workflow.meta or {}), "extra_pnginfo": extra_pnginfo}
    return workflow, plan, report


async def post_prompt(request: web.Request) -> web.Response:
    """Queue a prompt; it is in the store (and survives a restart) before the answer goes out."""
    try:
        asked = comfy.PromptRequest.parse(await _json_body(request))
        workflow, plan, report = _compile(request.app, asked.document, asked.targets, asked.extra)
    except (comfy.PromptRequestError, WorkflowError, ValidationFailed) as exc:
        return web.json_response(comfy.prompt_refused(exc, getattr(exc, "report", None)), status=400)
    try:
        item = request.app["queue"].put(workflow, asked.document, plan, asked.client_id, asked.extra,
                                        front=asked.front, number=asked.number, prompt_id=asked.prompt_id,
                                        report=report, targets=asked.targets)
    except ValueError as exc:
        return web.json_response(comfy.prompt_refused(str(exc)), status=400)
    return web.json_response({"prompt_id": item.prompt_id, "number": item.number, "node_errors": {}})


async def import_document(request: web.Request) -> web.Response:
    """``POST /nodegraph/import``: a ComfyUI workflow (UI or API format; ours passes through) in our format, for the
    canvas to open. Unsupported nodes or values: 400 with every one of them, in ``/prompt``'s error shape."""
    document = await _json_body(request)
    report = None
    try:
        workflow, report = _load_document(request.app, document)
    except (WorkflowError, ValidationFailed) as exc:
        return web.json_response(comfy.prompt_refused(exc, report), status=400)
    return web.json_response(workflow.to_json())


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


async def object_info(request: web.Request) -> web.Response:
    registry = request.app["executor"].registry
    loop = asyncio.get_running_loop()
    # option lists may read folders: keep that off the event loop
    settings = _settings(request)
    info = await loop.run_in_executor(None, lambda: {t.name: comfy.object_info(t, settings) for t in registry})
    return web.json_response(info)


async def object_info_one(request: web.Request) -> web.Response:
    node_type = request.app["executor"].registry.get(request.match_info["node_type"])
    if node_type is None:
        return web.json_response({})
    return web.json_response({node_type.name: comfy.object_info(node_type, _settings(request))})


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
    """ComfyUI's upload: a multipart ``image`` file (+ ``subfolder``, ``type``, ``overwrite``). The file is judged by
    its bytes, not by the type its part declares (clients send application/octet-stream or nothing): it must be an
    image Pillow can read, and it is stored under a suffix of its real format, so ``/view`` never serves it as
    anything else."""
    if not request.content_type.startswith("multipart/"):
        raise web.HTTPUnsupportedMediaType(text="upload with multipart/form-data")
    form = await request.post()
    upload = form.get("image")
    if not isinstance(upload, web.FileField):
        raise web.HTTPBadRequest(text="the form needs an \"image\" file field")
    kind = str(form.get("type", "input"))
    subfolder = str(form.get("subfolder", ""))
    unsafe = file_name_problem(subfolder, allow_empty=True)  # refused in every spelling, as validation refuses it
    if unsafe is not None:
        raise web.HTTPBadRequest(text=f"subfolder {unsafe}")
    overwrite = str(form.get("overwrite", "")).lower() in ("1", "true", "yes")
    data = upload.file.read()
    name = _image_name(Path(upload.filename or "upload").name, _image_format(data, _settings(request).max_image_size))
    target = _file_folder(kind).path(_settings(request), f"{subfolder}/{name}" if subfolder else name)
    if target.exists() and not overwrite:
        stem, suffix, n = target.stem, target.suffix, 1
        while target.exists():
            target = target.with_name(f"{stem} ({n}){suffix}")
            n += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, target)  # never a half-written file under the final name
    except OSError as exc:  # a full disk, a read-only folder: no partial file is left
        partial.unlink(missing_ok=True)
        log.warning("upload of %s failed: %s", target, exc)
        raise web.HTTPInsufficientStorage(text=f"cannot store {target.name!r} in the {kind} folder: "
                                               f"{exc.strerror or exc}") from None
    return web.json_response({"name": target.name, "subfolder": subfolder, "type": kind})


def _image_format(data: bytes, max_size: int) -> str:
    """The image format of ``data`` as Pillow names it (PNG, JPEG, WEBP, ...); 415 when it is not an image, 413 when
    its header declares more than ``max_size`` pixels per side (judged before any pixel is decoded)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, (width, height) = image.format, image.size
            if width <= max_size and height <= max_size:
                image.verify()
    except Image.DecompressionBombError as exc:
        raise web.HTTPRequestEntityTooLarge(max_size=max_size, actual_size=len(data),
                                            text=f"the image is refused as a decompression bomb: {exc}") from None
    except Exception:
        raise web.HTTPUnsupportedMediaType(text="the file is not an image (PNG, JPEG, WebP, GIF, BMP or TIFF)") \
            from None
    if width > max_size or height > max_size:
        raise web.HTTPRequestEntityTooLarge(
            max_size=max_size, actual_size=len(data),
            text=f"the image is {width}x{height} pixels, over the size limit of {max_size} pixels per side "
                 f"(NODEGRAPH_MAX_SIZE)")
    if kind not in IMAGE_FORMATS:
        raise web.HTTPUnsupportedMediaType(text=f"{kind} images are not accepted (PNG, JPEG, WebP, GIF, BMP or "
                                                f"TIFF)")
    return kind


def _image_name(name: str, kind: str) -> str:
    """``name`` with a suffix of its real format: kept when it already is one, else the format's added."""
    suffixes = IMAGE_FORMATS[kind]
    if Path(name).suffix.lower() in suffixes:
        return name
    return f"{name or 'upload'}{suffixes[0]}"


async def interrupt(request: web.Request) -> web.Response:
    prompt_id = None
    if request.can_read_body:
        try:
            body = await _json_body(request)
        except web.HTTPBadRequest:
            body = None  # as ComfyUI: a body that is not JSON interrupts whatever runs
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
    stats = {
        "system": {"os": platform.system().lower(), "python_version": sys.version.split()[0],
                   "nodegraph_version": __version__, "ram_total": ram_total, "ram_free": ram_free,
                   "embedded_python": False, "argv": []},
        "devices": devices, "cache": cache}
    runner = request.app["runner"]
    if runner is not None and hasattr(runner, "workers"):  # a cluster: its workers, their devices and models
        try:
            found = await asyncio.get_running_loop().run_in_executor(None, runner.workers)
        except Exception as exc:  # the scheduler is unreachable: say so, the rest of the answer still stands
            stats["workers_error"] = f"{type(exc).__name__}: {exc}"
            found = {}
        stats["workers"] = [{"address": address, **info} for address, info in sorted(found.items())]
    return web.json_response(stats)


async def models_index(request: web.Request) -> web.Response:
    """The model folders the node types read (ComfyUI's folder names), whether or not they exist yet."""
    return web.json_response(list(folders_of(request.app["executor"].registry)))


async def models_list(request: web.Request) -> web.Response:
    folder = folders_of(request.app["executor"].registry).get(request.match_info["folder"])
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
          data_dir: str | Path = "data", cache=None, scheduler: str | None = None) -> int:
    """Run the server until interrupted (``nodegraph serve``); with ``scheduler``, prompts run on that Dask
    cluster's workers (``nodegraph.cluster``)."""
    for folder in FILE_FOLDERS.values():
        folder.root(settings).mkdir(parents=True, exist_ok=True)
    config = ServerConfig(host=host, port=port, token=token or os.environ.get("NODEGRAPH_TOKEN"),
                          allowed_hosts=allowed_hosts)
    if not config.loopback and not config.token:
        config.token = secrets.token_urlsafe(24)
        print(f"bound to {host}, which is not loopback: requests need the bearer token {config.token}")
    executor = Executor(registry, cache=cache, settings=settings)
    runner = None
    if scheduler:
        from .cluster import DaskRunner  # imported late: the cluster extra is only needed with a scheduler

        runner = DaskRunner.connect(scheduler, executor)
    app = create_app(executor, config, History(Path(data_dir) / "history.sqlite3"), library, runner)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"nodegraph: open http://{shown}:{port}/" + (f"#token={config.token}" if config.token else ""),
          flush=True)
    web.run_app(app, host=host, port=port, print=None, access_log=None)
    return 0
