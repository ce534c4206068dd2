"""Small helpers for driving the canvas with real mouse and keyboard events."""

from __future__ import annotations

import json


def graph(page) -> dict:
    """The workflow JSON the canvas holds (read from the model, not scraped from pixels)."""
    return page.evaluate("window.nodegraph.app.graph.toJSON()")


def node(page, node_id):
    return page.locator(f'.ng-node[data-id="{node_id}"]')


def socket(page, node_id, direction, name):
    return page.locator(f'.ng-socket[data-node="{node_id}"][data-dir="{direction}"][data-name="{name}"]')


def row(page, node_id, name):
    """The row of an input (a widget row or a socket slot)."""
    return node(page, node_id).locator(f'[data-input="{name}"]').first


def center(locator) -> tuple[float, float]:
    box = locator.bounding_box()
    assert box is not None, f"{locator} is not visible"
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def drag(page, start, end, steps: int = 10, modifiers: tuple[str, ...] = ()) -> None:
    for key in modifiers:
        page.keyboard.down(key)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=steps)
    page.mouse.up()
    for key in modifiers:
        page.keyboard.up(key)


def connect(page, from_id, output, to_id, input_name) -> None:
    drag(page, center(socket(page, from_id, "out", output)), center(socket(page, to_id, "in", input_name)))


def add_from_palette(page, type_name: str) -> str:
    """Search the palette and click the entry; returns the new node's id."""
    before = set(graph(page)["nodes"])
    page.fill(".palette-search", type_name)
    page.click(f'.palette-item[data-type="{type_name}"]')
    after = set(graph(page)["nodes"])
    (new,) = after - before
    return new


def move_node(page, node_id, dx: float, dy: float) -> None:
    x, y = center(node(page, node_id).locator(".ng-title-text"))
    drag(page, (x, y), (x + dx, y + dy))


def nodes_of_type(doc: dict, type_name: str) -> list[str]:
    return [nid for nid, n in doc["nodes"].items() if n["type"] == type_name]


def load(page, doc: dict, name: str = "test") -> None:
    page.evaluate("([doc, name]) => window.nodegraph.app.loadDocument(doc, {name})", [doc, name])


def dumps(doc: dict) -> str:
    return json.dumps(doc, sort_keys=True)
