"""Where the canvas (``web/``) and the example workflows (``workflows/``) live.

In a wheel they are packaged inside ``nodegraph/`` (``_web``, ``_workflows``); in a source checkout or an editable
install they are the repository's top-level folders. Callers never need to know which.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _asset_dir(packaged: str, source: str) -> Path:
    inside = _PACKAGE / packaged
    return inside if inside.is_dir() else _PACKAGE.parent / source


def web_dir() -> Path:
    return _asset_dir("_web", "web")


def workflows_dir() -> Path:
    return _asset_dir("_workflows", "workflows")


def find_workflow(name_or_path: str) -> Path:
    """A workflow file by path, or a shipped example by name (``text-to-image`` for ``workflows/text-to-image.json``)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix == ".json" or "/" in name_or_path:
        return path
    shipped = workflows_dir() / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    return path


def shipped_workflows() -> list[str]:
    folder = workflows_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
