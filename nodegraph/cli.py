"""The ``nodegraph`` command: run, validate and inspect workflows headless (and, with ``serve``, start the server);
``import`` and ``export`` convert between our format and ComfyUI's; ``worker`` and ``cluster`` scale the server out
over a Dask cluster (``nodegraph.cluster``).

``run``, ``validate``, ``import`` and ``export`` read a workflow in any format: ours, ComfyUI's API prompt or its
editor's (UI) save file, as JSON or as a PNG that carries one (ours, or ComfyUI's ``prompt`` / ``workflow`` text
chunks).

Exit status: 0 when the run succeeded, 1 when a node failed or the run was cancelled, 2 for invalid input (a bad
workflow file, validation errors, unsupported ComfyUI nodes, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import events as ev
from .assets import find_workflow, shipped_workflows
from .cache import ResultCache
from .executor import Executor, RunResult
from .library import BUILTIN, NoLibrary, load_library
from .registry import Registry, RegistryError, build_registry
from .settings import DTYPES, MEMORY_FORMATS, Settings
from .validate import ValidationFailed
from .workflow import PNG_KEY, Limits, Workflow, WorkflowError, read_document

def parse_set(items: Sequence[str]) -> list[tuple[str, str, Any]]:
    """``NODE.INPUT=VALUE`` overrides; VALUE is JSON when it parses as JSON, text otherwise."""
    out = []
    for item in items:
        key, eq, raw = item.partition("=")
        node, dot, name = key.rpartition(".")
        if not eq or not dot or not node or not name:
            raise ValueError(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. --set 3.seed=42")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.append((node, name, value))
    return out


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", metavar="DIR", help="models root (default: $NODEGRAPH_MODELS or ./models)")
    p.add_argument("--input", metavar="DIR", help="input images folder (default: $NODEGRAPH_INPUT or ./input)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading .ckpt/.pt pickle checkpoints (with torch's weights_only=True)")
    p.add_argument("--node-path", metavar="DIR", action="append", default=[],
                   help="a folder of extra node packages (repeatable)")
    p.add_argument("--device", help="torch device for the diffusion nodes (default: cuda > mps > cpu)")
    p.add_argument("--dtype", choices=DTYPES, help="weights dtype (default per device)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="compile models where the node library can: the first run of each image size is slow "
                        "(a minute or more), later ones faster; for long-running servers ($NODEGRAPH_COMPILE)")
    p.add_argument("--map-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="keep weight files memory-mapped where they are used as stored (float32 files in float32, "
                        "on the CPU): loads in a fraction of the time, like diffusers. Default: where a lease "
                        "guards the file against being rewritten in place (Linux, your own files), copied "
                        "elsewhere; --map-weights maps unguarded files too, --no-map-weights always copies "
                        "($NODEGRAPH_MAP_WEIGHTS=1, 0 or auto)")
    p.add_argument("--memory-format", choices=MEMORY_FORMATS,
                   help="layout of convolution weights (default auto: channels_last on the CPU, faster there; "
                        "contiguous gives results bit-identical to diffusers' pipelines)")
    p.add_argument("--cache-gb", type=float, default=None,
                   help="memory budget of the result cache: models and results, each tensor counted once "
                        "(default: $NODEGRAPH_CACHE_GB or 8); least recently used go first; 0 caches nothing")
    p.add_argument("--no-builtin", action="store_true",
                   help="leave out the built-in node library (only the --node-path packages)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the nodes do")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodegraph", description="Run node-graph workflows for fast LCM image "
                                                                   "generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="validate and run a workflow")
    run.add_argument("workflow", help="a workflow .json file, or the name of a shipped example "
                                      f"({', '.join(shipped_workflows()) or 'none'})")
    run.add_argument("--set", metavar="NODE.INPUT=VALUE", action="append", default=[], help="override an input")
    run.add_argument("--output", metavar="DIR", help="where output nodes write (default: $NODEGRAPH_OUTPUT or ./output)")
    run.add_argument("--json", action="store_true", help="print the result as JSON instead of a summary")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(run)

    validate = sub.add_parser("validate", help="check a workflow without running it")
    validate.add_argument("workflow")
    _add_common(validate)

    imp = sub.add_parser("import", help="convert a ComfyUI workflow (UI or API format, JSON or PNG) to ours")
    imp.add_argument("workflow", help="a ComfyUI workflow .json file, or a PNG ComfyUI saved")
    imp.add_argument("-o", "--output-file", metavar="OUT",
                     help="where to write it (default: the file's name with .nodegraph.json)")
    _add_common(imp)

    export = sub.add_parser("export", help="convert a workflow to ComfyUI's API format")
    export.add_argument("workflow")
    export.add_argument("--comfy-api", action="store_true", required=True,
                        help="write ComfyUI's API format (what its POST /prompt runs)")
    export.add_argument("-o", "--output-file", metavar="OUT",
                        help="where to write it (default: the file's name with .comfy-api.json; - for stdout)")
    _add_common(export)

    nodes = sub.add_parser("nodes", help="list the node types")
    nodes.add_argument("--json", action="store_true", help="every node type with its inputs and outputs, as JSON")
    _add_common(nodes)

    serve = sub.add_parser("serve", help="start the HTTP server and the browser canvas")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8188)
    serve.add_argument("--output", metavar="DIR", help="where output nodes write (default: $NODEGRAPH_OUTPUT or "
                                                      "./output)")
    serve.add_argument("--data", metavar="DIR", default="data", help="where the run history is kept")
    serve.add_argument("--allow-host", metavar="NAME", action="append", default=[],
                       help="an extra Host header value to accept (repeatable)")
    serve.add_argument("--token", help="bearer token required from clients (default: $NODEGRAPH_TOKEN; one is "
                                       "generated when binding a non-loopback address)")
    serve.add_argument("--scheduler", metavar="ADDR",
                       help="run prompts on the workers of this Dask scheduler (tcp://HOST:8786; tls:// with Dask's "
                            "TLS configuration) instead of in this process; see docs/scale-out.md")
    _add_common(serve)

    worker = sub.add_parser("worker", help="run prompts for a server's cluster: a Dask worker holding the engine "
                                           "(needs the cluster extra)")
    worker.add_argument("--scheduler", metavar="ADDR", required=True, help="the Dask scheduler (tcp://HOST:8786)")
    worker.add_argument("--name", help="the worker's name in the cluster (default: Dask's)")
    _add_common(worker)

    cluster = sub.add_parser("cluster", help="start a Dask scheduler for servers and workers to meet at")
    cluster.add_argument("--host", default="127.0.0.1",
                         help="address to bind (default: loopback only; keep the port off the internet)")
    cluster.add_argument("--port", type=int, default=8786)
    cluster.add_argument("--protocol", choices=("tcp", "tls"), default=None,
                         help="tls: encrypted and authenticated with the certificates of Dask's configuration "
                              "(docs/scale-out.md); default tls when that configuration requires encryption, else tcp")
    cluster.add_argument("-v", "--verbose", action="store_true", help="log what the scheduler does")
    return parser


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Settings:
    """The process's settings: the environment's, then what the command line gives."""
    return Settings.from_env(environ, models_dir=args.models, input_dir=args.input,
                             output_dir=getattr(args, "output", None), device=args.device, dtype=args.dtype,
                             memory_format=args.memory_format, allow_pickle=args.allow_pickle or None,
                             compile=args.compile, map_weights=args.map_weights)


def quiet_openmp(command: str, environ=os.environ) -> None:
    """Servers and workers: OpenMP threads sleep between parallel regions unless the user chose otherwise.

    Their compute threads share the cores with an event loop, which OpenMP's default spinning starves (the
    20-client soak ran at 1.9 prompts/s instead of 8.9 on 2 cores). The runtime reads the variable when it loads,
    so this runs before the node library imports its compute libraries."""
    if command in ("serve", "worker"):
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "cluster":
        return _cmd_cluster(args)
    quiet_openmp(args.command)
    try:
        settings = settings_from_args(args)
        cache = _cache(args)
        library = NoLibrary() if args.no_builtin else load_library(BUILTIN)
        library.configure(settings)
        registry = build_registry(args.node_path, library)
    except (RegistryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "nodes":
        return _cmd_nodes(registry, settings, args)
    if args.command == "serve":
        from .server import serve  # imported late: aiohttp is only needed for the server
        return serve(registry, settings, library, host=args.host, port=args.port, token=args.token,
                     allowed_hosts=tuple(args.allow_host), data_dir=args.data, cache=cache,
                     scheduler=args.scheduler)
    if args.command == "worker":
        return _cmd_worker(args, settings, cache)
    if args.command in ("import", "export"):
        return _cmd_convert(args, library, settings)
    try:
        workflow, _ = load_any(find_workflow(args.workflow), library, settings)
        if args.command == "run":
            for node, name, value in parse_set(args.set):
                workflow.set(node, name, value)
        executor = Executor(registry, cache=cache, settings=settings)
        plan = executor.compile(workflow)
    except (WorkflowError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationFailed as exc:
        print(f"error: the workflow is invalid ({len(exc.errors)} problem(s)):", file=sys.stderr)
        for error in exc.errors:
            print(f"  - {error}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"ok: {len(plan.order)} node(s) would run")
        return 0
    result = _run_with_progress(executor, plan, show=not (args.no_progress or args.json))
    _report(result, executor, args.json)
    return 0 if result.status == "success" else 1


def load_any(path: str | Path, library, settings: Settings, *, editor_first: bool = False) -> tuple[Workflow, str]:
    """A workflow file in any format we read (see the module's docstring), with the format it was in. A PNG from
    ComfyUI carries both of its formats: the API prompt is what ran, so it is taken first, unless ``editor_first``
    (``import``, which keeps the editor's layout, titles, groups and notes)."""
    from .comfy_format import load_document

    keys = (PNG_KEY, "workflow", "prompt") if editor_first else (PNG_KEY, "prompt", "workflow")
    data = read_document(path, keys, what="a workflow (neither ours nor ComfyUI's)")
    return load_document(data, library, settings, Limits())


def _cmd_convert(args, library, settings: Settings) -> int:
    """``import`` (any format -> ours) and ``export --comfy-api`` (any format -> ComfyUI's API format)."""
    from .comfy_format import auto_layout

    source = Path(args.workflow)
    stem = source.name.removesuffix(source.suffix).removesuffix(".nodegraph")
    try:
        workflow, kind = load_any(find_workflow(args.workflow), library, settings,
                                  editor_first=args.command == "import")
        if args.command == "import":
            auto_layout(workflow)  # an API prompt has no layout: the canvas shows it left to right
            text = workflow.dumps()
            target = args.output_file or str(source.with_name(stem + ".nodegraph.json"))
        else:
            comfy = getattr(library, "comfy", None)
            if comfy is None:
                raise WorkflowError("this node library cannot write ComfyUI workflows")
            text = json.dumps(comfy.to_api(workflow), indent=2, ensure_ascii=False)
            target = args.output_file or str(source.with_name(stem + ".comfy-api.json"))
    except (WorkflowError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if target == "-":
        print(text)
        return 0
    out = Path(target)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(text + "\n", encoding="utf-8")
    partial.replace(out)  # never a half-written file under the final name
    formats = {"nodegraph": "our format", "comfy_api": "ComfyUI's API format", "comfy_ui": "ComfyUI's UI format"}
    print(f"wrote {out} ({len(workflow.nodes)} node(s), from {formats.get(kind, kind)})")
    return 0


#: The result cache's budget in GiB when --cache-gb is not given (not a Settings field: it changes no result).
CACHE_GB_ENV = "NODEGRAPH_CACHE_GB"
DEFAULT_CACHE_GB = 8.0


def _cache(args) -> ResultCache:
    """The result cache, its memory budget from --cache-gb, else $NODEGRAPH_CACHE_GB, else 8 GiB."""
    gb = getattr(args, "cache_gb", None)
    if gb is None:
        raw = os.environ.get(CACHE_GB_ENV, "").strip()
        try:
            gb = float(raw) if raw else DEFAULT_CACHE_GB
        except ValueError:
            raise ValueError(f"${CACHE_GB_ENV}={raw!r}: expected a number of GiB, e.g. 4") from None
    if not gb >= 0 or gb == float("inf"):
        raise ValueError(f"the cache budget must be a finite number of GiB >= 0, not {gb}")
    return ResultCache(max_bytes=int(gb * 1024**3))


def _cmd_worker(args, settings: Settings, cache: ResultCache) -> int:
    """``nodegraph worker``: a Dask worker with one GPU resource and the engine (``nodegraph.cluster``)."""
    import asyncio

    try:
        from distributed import Worker
    except ImportError:
        print("error: nodegraph worker needs the cluster extra: pip install 'nodegraph[cluster]'", file=sys.stderr)
        return 2
    from .cluster import GPU, NodegraphWorker

    plugin = NodegraphWorker(settings, node_paths=args.node_path, cache_bytes=cache.max_bytes,
                             builtin=not args.no_builtin)

    async def work() -> None:
        async with Worker(args.scheduler, nthreads=1, resources={GPU: 1}, plugins=(plugin,), name=args.name) as w:
            print(f"nodegraph worker {w.address} on {settings.device or 'the default device'}, scheduler "
                  f"{args.scheduler}", flush=True)
            await w.finished()

    try:
        asyncio.run(work())
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_cluster(args) -> int:
    """``nodegraph cluster``: a Dask scheduler (what ``dask scheduler`` starts, bound to loopback by default)."""
    import asyncio

    try:
        from distributed import Scheduler
    except ImportError:
        print("error: nodegraph cluster needs the cluster extra: pip install 'nodegraph[cluster]'", file=sys.stderr)
        return 2

    import dask

    # a prompt whose worker dies runs again once on another worker, then fails (Dask's default is 3 tries)
    dask.config.set({"distributed.scheduler.allowed-failures": 1})

    protocol = args.protocol or ("tls" if dask.config.get("distributed.comm.require-encryption", False) else "tcp")

    async def schedule() -> None:
        async with Scheduler(host=args.host, port=args.port, protocol=f"{protocol}://", dashboard=False) as scheduler:
            print(f"nodegraph scheduler at {scheduler.address}", flush=True)
            await scheduler.finished()

    try:
        asyncio.run(schedule())
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_nodes(registry: Registry, settings: Settings, args) -> int:
    if args.json:
        print(json.dumps(registry.to_json(settings), indent=2))
        return 0
    for node_type in registry:
        if node_type.deprecated:
            continue
        first_line = node_type.description.splitlines()[0] if node_type.description else ""
        print(f"{node_type.category + '/' + node_type.name:40s} {first_line}")
    return 0


def _run_with_progress(executor: Executor, plan, show: bool) -> RunResult:
    if not show:
        return executor.run(plan)
    from tqdm import tqdm

    bar = tqdm(total=len(plan.order), unit="node", dynamic_ncols=True, leave=True)
    names = {n.id: n.type.name for n in plan.order}

    def on_event(event: ev.Event) -> None:
        if event.type in (ev.NODE_FINISHED, ev.NODE_CACHED, ev.NODE_FAILED, ev.NODE_SKIPPED):
            bar.update(1)
        elif event.type == ev.NODE_STARTED:
            bar.set_description(f"{names[event.node_id]} #{event.node_id}")
        elif event.type == ev.NODE_PROGRESS and event.data.get("max"):
            bar.set_postfix_str(f"{event.data['value']}/{event.data['max']}")

    unsubscribe = executor.events.subscribe(on_event)
    try:
        return executor.run(plan)
    finally:
        unsubscribe()
        bar.close()


def _report(result: RunResult, executor: Executor, as_json: bool) -> None:
    files = [str(Path(executor.output_dir) / item.get("subfolder", "") / item["filename"])
             for ui in result.ui.values() for items in ui.values() if isinstance(items, list)
             for item in items if isinstance(item, dict) and "filename" in item]
    if as_json:
        print(json.dumps({"run_id": result.run_id, "status": result.status, "duration": result.duration,
                          "nodes": {k: v.to_json() for k, v in result.nodes.items()}, "ui": result.ui,
                          "files": files}, indent=2, default=repr))
        return
    for path in files:
        print(f"wrote {path}")
    for error in result.errors:
        print(f"error in node {error['node_id']} ({error['type']}): {error['exception_type']}: {error['message']}",
              file=sys.stderr)
    print(result.summary())


if __name__ == "__main__":
    sys.exit(main())
