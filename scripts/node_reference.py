"""Write the README's node reference from the node declarations themselves (their docstrings are the help text).

    python scripts/node_reference.py          # rewrite the section between the markers in README.md
    python scripts/node_reference.py --check  # exit 1 if README.md is out of date (the tests run this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- node-reference:begin -->", "<!-- node-reference:end -->"


def describe_input(spec: dict) -> str:
    if spec["kind"] == "socket":
        text = f"`{spec['name']}`: {spec['type']}"
    else:
        bits = []
        if "default" in spec and spec["kind"] != "LIST":
            bits.append(f"default {spec['default']!r}")
        if spec.get("min") is not None or spec.get("max") is not None:
            bits.append(f"{spec.get('min', '')}..{spec.get('max', '')}")
        if spec.get("step"):
            bits.append(f"step {spec['step']}")
        if spec["kind"] == "COMBO" and spec.get("dynamic"):
            bits.append("listed from its folder at run time")
        elif spec["kind"] == "COMBO":
            bits.append("one of " + ", ".join(spec["options"]))
        if spec.get("accepts_other"):
            bits.append(f"or {spec['accepts_other']}")
        text = f"`{spec['name']}`: {spec['kind']}" + (f" ({'; '.join(bits)})" if bits else "")
    return text + (" (optional)" if spec.get("optional") else "")


def reference() -> str:
    import nodegraph as ng

    lines = []
    by_category: dict[str, list] = {}
    for node in ng.build_registry():
        if not node.deprecated:
            by_category.setdefault(node.category, []).append(node.to_json())
    for category in sorted(by_category):
        lines.append(f"### {category}\n")
        for doc in by_category[category]:
            outs = ", ".join(f"`{o['name']}`: {o['type']}" for o in doc["outputs"]) or "files shown on the canvas"
            lines.append(f"**{doc['name']}**: {doc['description']}\n")
            lines.append(f"- inputs: {'; '.join(describe_input(i) for i in doc['inputs']) or 'none'}")
            lines.append(f"- outputs: {outs}\n")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    updated = f"{head}{BEGIN}\n{reference()}{END}{tail}"
    if args.check:
        if updated != text:
            print("README.md's node reference is out of date: run python scripts/node_reference.py")
            return 1
        return 0
    readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
