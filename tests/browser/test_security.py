"""The canvas under its Content-Security-Policy, and hostile text in a workflow: the page works with the policy on
(no violation reported while it loads and runs a graph), and markup in titles, notes, groups, values and error
messages is shown as text, never run."""

from __future__ import annotations

import pytest

from .helpers import load, node

pytestmark = pytest.mark.browser

# Recorded from the first script on: the page's own modules must never trip the policy.
WATCH_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation",
  e => window.__violations.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`));
"""

PAYLOADS = ['<img src=x onerror="window.__pwned=1">', "<script>window.__pwned=2</script>",
            '"><svg onload="window.__pwned=3">', "<b>bold</b>&amp;"]


def reload_watching(page) -> list[str]:
    console: list[str] = []
    page.on("console", lambda msg: console.append(msg.text))
    page.add_init_script(WATCH_VIOLATIONS)
    response = page.reload()
    page.wait_for_function("() => window.nodegraph && document.body.classList.contains('ready')")
    page.csp = response.headers.get("content-security-policy", "")
    return console


def test_the_canvas_loads_and_runs_a_workflow_under_its_content_security_policy(page):
    console = reload_watching(page)
    assert "script-src 'self'" in page.csp and "frame-ancestors 'none'" in page.csp
    load(page, {"format": "nodegraph/workflow", "version": 1, "nodes": {
        "1": {"type": "TestPattern", "inputs": {"width": 32, "height": 32, "seed": 3, "steps": 3},
              "ui": {"pos": [0, 0]}},
        "2": {"type": "SaveImage", "inputs": {"images": {"link": ["1", "image"]}, "filename_prefix": "csp"},
              "ui": {"pos": [320, 0]}},
    }})
    page.click("#btn-run")
    image = node(page, "2").locator("img.ng-image:not(.ng-preview)").first
    image.wait_for(timeout=60_000)
    page.wait_for_function("img => img.complete && img.naturalWidth === 32", arg=image.element_handle())
    assert page.evaluate("window.__violations") == []
    assert not [m for m in console if "Content Security Policy" in m], console


def test_markup_in_a_workflow_is_shown_as_text_and_never_runs(page):
    reload_watching(page)
    doc = {"format": "nodegraph/workflow", "version": 1, "nodes": {}, "notes": [], "groups": []}
    for i, payload in enumerate(PAYLOADS):
        doc["nodes"][str(i + 1)] = {"type": "TestOptions", "inputs": {"label": payload, "notes": payload},
                                    "ui": {"pos": [i * 300, 0], "title": payload}}
        doc["notes"].append({"text": payload, "pos": [i * 300, 500]})
        doc["groups"].append({"title": payload, "bounding": [i * 300 - 10, -40, 280, 400]})
    # an unknown node type and a file name that validation refuses: their names come back in error messages
    doc["nodes"]["9"] = {"type": PAYLOADS[0], "inputs": {}, "ui": {"pos": [0, 700]}}
    doc["nodes"]["10"] = {"type": "SaveImage", "inputs": {"filename_prefix": "../" + PAYLOADS[1]},
                          "ui": {"pos": [300, 700]}}
    load(page, doc, name=PAYLOADS[0])
    page.keyboard.press("Control+Enter")
    page.locator(".ng-node.has-error").first.wait_for()
    page.locator(".toast.error").first.wait_for()
    text = page.evaluate("document.body.innerText")
    for payload in PAYLOADS:
        assert payload in text, payload
    assert page.evaluate("window.__pwned") is None
    # nothing the workflow held became an element
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"], svg[onload], b').length") == 0
    assert page.evaluate("[...document.scripts].every(s => s.src.endsWith('/web/main.js'))")
    assert page.evaluate("window.__violations") == []
    # the page's own errors (the refused run) are expected here; anything else is not
    page.js_errors[:] = [e for e in page.js_errors if "Content Security Policy" in e]
