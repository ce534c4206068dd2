"""The boundary between the engine and a node library: what the engine, the CLI and the server may ask of it.

The engine runs any typed nodes; a library (the built-in ``nodes`` package, or another one) brings them, with the
few services a server needs around them. A library is a module or object with:

- ``NODES``: its node classes;
- ``configure(settings)``: called once with the process's settings before anything runs; checks them (a device
  that does not exist is an error at start-up, not at the first run) and does process-wide preparation. It must
  not keep the settings: they reach nodes through ``ctx.settings``;
- ``free()``: release what it holds beyond the result cache (accelerator memory), for ``POST /free``;
- ``system_info(settings)``: its compute devices, in the shape of ComfyUI's ``/system_stats`` ``devices``;
- ``comfy`` (optional; None or absent: the library cannot read ComfyUI workflows): what ComfyUI's node types are in
  this library (``ComfySupport``), used by ``nodegraph.comfy_format.load_document`` and ``export --comfy-api``.

Its model folders need no hook: they are found from the node declarations (``nodegraph.folders.folders_of``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

from .registry import RegistryError

if TYPE_CHECKING:
    from .node import Node
    from .settings import Settings
    from .workflow import Workflow

BUILTIN = "nodes"


class ComfySupport(Protocol):
    """A library's ComfyUI node types (its ``comfy`` member): the engine reads ComfyUI's formats generically
    (``nodegraph.comfy_format``) and asks the library what the node types are."""

    def widget_names(self, class_type: str) -> list[str] | None:
        """The type's widget names in ``widgets_values`` order, the editor-only entries
        (``comfy_format.UI_ONLY_WIDGETS``) at their places; None for a type the library does not know."""

    def to_workflow(self, api: dict, ui: dict | None = None, settings: "Settings | None" = None) -> "Workflow":
        """An API-format prompt (and the editor data ``ui_to_api`` returns) as a Workflow with the ComfyUI node ids;
        ``comfy_format.UnsupportedWorkflow`` listing everything it cannot run."""

    def to_api(self, workflow: "Workflow") -> dict[str, Any]:
        """A Workflow in the API format, for the node types that map back; ``UnsupportedWorkflow`` otherwise."""


@runtime_checkable
class Library(Protocol):
    NODES: Sequence[type["Node"]]

    def configure(self, settings: "Settings") -> None: ...

    def free(self) -> None: ...

    def system_info(self, settings: "Settings") -> list[dict]: ...

    # Optional, and so not a member of the runtime check: ``comfy: ComfySupport | None``.


class NoLibrary:
    """A library of no nodes and no devices: node packages alone (``--no-builtin``), and tests with toy nodes."""

    NODES: Sequence[type["Node"]] = ()
    comfy: ComfySupport | None = None  # reads no ComfyUI workflows

    def configure(self, settings: "Settings") -> None:
        pass

    def free(self) -> None:
        pass

    def system_info(self, settings: "Settings") -> list[dict]:
        return []


def load_library(name: str = BUILTIN) -> Library:
    """Import the library module ``name``; a clear error when it does not provide the interface."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise RegistryError(f"node library {name!r} cannot be imported: {exc}") from exc
    missing = [attr for attr in ("NODES", "configure", "free", "system_info") if not hasattr(module, attr)]
    if missing:
        raise RegistryError(f"node library {name!r} lacks {', '.join(missing)} (see nodegraph.library.Library)")
    return module  # type: ignore[return-value]
