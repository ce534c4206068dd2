"""Folders of files that nodes read by name: model folders, the input images, the outputs.

A ``Folder`` is a declaration (its name, where it lives relative to the settings, which entries it lists) and
everything a file name taken from a workflow or an HTTP request goes through: the choices a widget offers, where a
name is on disk (confined to the folder after resolving symlinks), what identifies its content for the result
cache, and the "read from ..." hint of an error. Loaders, ``/models``, ``/view`` and ``/upload`` all use it, so a
file the canvas lists is a file a node can load, and nothing else is.

A node declares the folder it reads with ``Combo(options=FOLDER)``; the library's model folders are found from
those declarations (``folders_of``), so adding a folder is one declaration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Iterable

from .cache import file_identity
from .paths import UnsafePath, safe_join

if TYPE_CHECKING:
    from .node import Node
    from .settings import Settings

MAX_DEPTH = 4  # folders of folders of models are searched this deep (and no deeper: a mistaken root stays cheap)


@dataclass(frozen=True)
class Folder:
    """A folder of named entries under one of the settings' folders.

    ``name``: the folder's key (``/models/{name}``, ComfyUI's folder names); ``what``: what its entries are, for
    messages ("LoRAs are read from ..."); ``suffixes``: the file suffixes listed (empty: every file, None: no
    files); ``entry_dir``: what a subfolder is: True, one entry (a diffusers model folder); False, not ours
    (skipped); None, a folder of entries (searched);
    ``setting``: the Settings field the folder lives under; ``subdir``: its path there (default: ``name``).
    """

    name: str
    what: str = "files"
    suffixes: tuple[str, ...] | None = ()
    entry_dir: Callable[[Path], bool | None] | None = None
    setting: str = "models_dir"
    subdir: str | None = None
    flag: str = ""  # the command-line option that moves it, for hints ("--input")

    def root(self, settings: "Settings") -> Path:
        base = Path(getattr(settings, self.setting))
        sub = self.name if self.subdir is None else self.subdir
        return base / sub if sub else base

    def with_suffixes(self, suffixes: tuple[str, ...], what: str | None = None) -> "Folder":
        """The same folder listing only files with ``suffixes`` (e.g. the input folder's images)."""
        return dataclasses.replace(self, suffixes=suffixes, what=what or self.what)

    # --- the Choices protocol of Combo ---------------------------------------------------------------------------

    def names(self, settings: "Settings") -> list[str]:
        """Entries, relative to the folder with '/' separators, sorted; links that lead outside are left out."""
        return list_entries(self.root(settings), self.suffixes, self.entry_dir)

    def identity(self, settings: "Settings", name: str) -> Hashable:
        try:
            return file_identity(self.path(settings, name))
        except UnsafePath:
            return (name, None)

    def hint(self, settings: "Settings") -> str:
        how = f"; put them there or use {self.flag}" if self.flag else ""
        return f"{self.what} are read from {self.root(settings)}{how}"

    # --- paths -----------------------------------------------------------------------------------------------------

    def path(self, settings: "Settings", name: str) -> Path:
        """Where ``name`` is or would be; raises ``UnsafePath`` for a name that leaves the folder."""
        return safe_join(self.root(settings), name)

    def locate(self, settings: "Settings", name: str) -> Path:
        """Where existing entry ``name`` is; a clear ``FileNotFoundError`` naming the folder otherwise."""
        path = self.path(settings, name)
        if not path.exists():
            raise FileNotFoundError(f"{name!r} is not in {self.root(settings)} ({self.what} are read from there)")
        return path


def list_entries(root: Path, suffixes: tuple[str, ...] | None = (),
                 entry_dir: Callable[[Path], bool | None] | None = None) -> list[str]:
    """What a folder holds: files with ``suffixes`` (any file when empty, none when None) and the subfolders that
    ``entry_dir`` calls entries, each as one name; subfolders it calls None are searched, ``MAX_DEPTH`` deep.
    Hidden entries are skipped, and so is anything that resolves outside ``root`` (``locate`` would refuse it)."""
    root = Path(root)
    if not root.is_dir():
        return []
    real_root = root.resolve()
    wanted = tuple(s.lower() for s in suffixes) if suffixes else ()
    found: list[str] = []
    stack = [(root, 0)]
    while stack:
        here, depth = stack.pop()
        try:
            entries = sorted(here.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            real = entry.resolve()
            if real_root not in real.parents:
                continue
            if entry.is_dir():
                kind = entry_dir(entry) if entry_dir is not None else None
                if kind:
                    found.append(entry.relative_to(root).as_posix())
                elif kind is None and depth + 1 < MAX_DEPTH:
                    stack.append((entry, depth + 1))
            elif suffixes is not None and entry.is_file() and (not wanted or entry.suffix.lower() in wanted):
                found.append(entry.relative_to(root).as_posix())
    return sorted(found)


def folders_of(node_types: Iterable[type["Node"]]) -> dict[str, Folder]:
    """The model folders node types read, found from their declarations: ``Combo(options=FOLDER)`` (in lists
    too), or choices and identities that carry a ``folder``."""
    from .spec import Combo, ListOf

    found: dict[str, Folder] = {}

    def visit(spec) -> None:
        if isinstance(spec, ListOf):
            for field in spec.fields:
                visit(field)
        else:  # a combo of a folder's files, or an input whose cache identity reads a folder (prompts)
            source = spec.options if isinstance(spec, Combo) else getattr(spec, "identity_of", None)
            folder = source if isinstance(source, Folder) else getattr(source, "folder", None)
            if isinstance(folder, Folder) and folder.setting == "models_dir":
                found.setdefault(folder.name, folder)

    for node_type in node_types:
        for spec in node_type.inputs.values():
            visit(spec)
    return dict(sorted(found.items()))


# The folders every deployment has. The node library narrows INPUT to the files it reads (images).
INPUT = Folder("input", what="input files", setting="input_dir", subdir="", flag="--input")
OUTPUT = Folder("output", what="outputs", setting="output_dir", subdir="", flag="--output")
TEMP = Folder("temp", what="previews", setting="temp_dir", subdir="")
FILE_FOLDERS = {f.name: f for f in (INPUT, OUTPUT, TEMP)}  # the "type" of ComfyUI's /view and /upload
