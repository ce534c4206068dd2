"""The registry of node types: the built-in library plus node packages from explicitly configured folders.

Nothing is discovered or installed behind the user's back: a node package is a Python file or package in a folder
the user names, and it exposes its node classes in a module-level ``NODES`` list. Two node types with one name are an
error at start-up, naming both origins.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .node import Node


class RegistryError(Exception):
    """A node package could not be loaded, or it clashes with another."""


class Registry:
    """Maps node type names to node classes."""

    def __init__(self, nodes: Iterable[type[Node]] = ()):
        self._types: dict[str, type[Node]] = {}
        self._origins: dict[str, str] = {}
        self.register_all(nodes, origin="<given>")

    def register(self, node_type: type[Node], origin: str = "<code>") -> None:
        if not (isinstance(node_type, type) and issubclass(node_type, Node)):
            raise RegistryError(f"{origin}: {node_type!r} is not a Node subclass")
        name = node_type.name
        if name in self._types and self._types[name] is not node_type:
            raise RegistryError(
                f"two node types are named {name!r}: one from {self._origins[name]}, one from {origin}")
        self._types[name] = node_type
        self._origins[name] = origin

    def register_all(self, node_types: Iterable[type[Node]], origin: str = "<code>") -> None:
        for node_type in node_types:
            self.register(node_type, origin)

    def load_module(self, module_name: str) -> None:
        """Register the ``NODES`` of an importable module (the built-in library is ``nodes``)."""
        module = importlib.import_module(module_name)
        self.register_all(_nodes_of(module, module_name), origin=module_name)

    def load_folder(self, folder: str | Path) -> list[str]:
        """Register every node package (``*.py`` file or package directory) found directly in ``folder``."""
        folder = Path(folder).resolve()
        if not folder.is_dir():
            raise RegistryError(f"node package folder {folder} does not exist")
        loaded = []
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith((".", "_")):
                continue
            if entry.is_file() and entry.suffix == ".py":
                init = entry
            elif entry.is_dir() and (entry / "__init__.py").is_file():
                init = entry / "__init__.py"
            else:
                continue
            self.register_all(_nodes_of(_import_path(entry.stem, init), str(entry)), origin=str(entry))
            loaded.append(str(entry))
        return loaded

    def get(self, name: str) -> type[Node] | None:
        return self._types.get(name)

    def __getitem__(self, name: str) -> type[Node]:
        return self._types[name]

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[type[Node]]:
        return iter(sorted(self._types.values(), key=lambda t: (t.category, t.name)))

    def __len__(self) -> int:
        return len(self._types)

    def to_json(self, settings: Any = None) -> dict:
        """Every node type keyed by name, as ``nodegraph nodes --json`` and ``/object_info`` serve it; choices
        computed from folders are listed as ``settings`` finds them."""
        return {t.name: t.to_json(settings) for t in self}


def build_registry(node_paths: Sequence[str] = (), library: Any = "nodes") -> Registry:
    """The library's node types plus node packages from the given folders (and ``NODEGRAPH_NODE_PATH``).
    ``library`` is a library, the name of one to import, or None for node packages only."""
    from .library import load_library

    registry = Registry()
    if isinstance(library, str):
        library = load_library(library)
    if library is not None:
        registry.register_all(library.NODES, origin=getattr(library, "__name__", type(library).__name__))
    env_paths = [p for p in os.environ.get("NODEGRAPH_NODE_PATH", "").split(os.pathsep) if p]
    for folder in [*env_paths, *node_paths]:
        registry.load_folder(folder)
    return registry


def _nodes_of(module, origin: str) -> list[type[Node]]:
    nodes = getattr(module, "NODES", None)
    if nodes is None:
        raise RegistryError(f"{origin} has no NODES list naming its node classes")
    return list(nodes)


def _import_path(stem: str, init: Path):
    # A private module name keeps packages from different folders (or the same name twice) from colliding.
    module_name = f"nodegraph_pkg_{abs(hash(str(init))):x}_{stem}"
    locations = [str(init.parent)] if init.name == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(module_name, init, submodule_search_locations=locations)
    if spec is None or spec.loader is None:
        raise RegistryError(f"cannot import node package {init}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken package must say which one broke
        del sys.modules[module_name]
        raise RegistryError(f"node package {init} failed to import: {type(exc).__name__}: {exc}") from exc
    return module
