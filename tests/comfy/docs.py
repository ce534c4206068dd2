"""The ComfyUI documents of tests/comfy/fixtures (written for these tests): API prompts under api/, editor saves
under ui/, by file name without .json."""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def api(name: str) -> dict:
    return json.loads((FIXTURES / "api" / f"{name}.json").read_text(encoding="utf-8"))


def ui(name: str) -> dict:
    return json.loads((FIXTURES / "ui" / f"{name}.json").read_text(encoding="utf-8"))


def names(kind: str) -> list[str]:
    return sorted(p.stem for p in (FIXTURES / kind).glob("*.json"))


def graph(prompt: dict) -> dict:
    """An API prompt without what does not run (titles): {id: (class_type, inputs)}."""
    return {nid: (node["class_type"], node["inputs"]) for nid, node in prompt.items()}
