"""A node for the persistent-queue tests, loaded into a server subprocess with ``--node-path``: it runs until the
test opens its gate, so a test can stop or kill the server while a prompt is running, and it leaves a trace of
what started and what finished in files (the server's memory does not survive what the tests do to it)."""

from __future__ import annotations

import time
from pathlib import Path

from nodegraph import Node, NodeOutput, String


class Gate(Node):
    """Writes ``label`` to ``folder``/started, waits until ``folder``/open exists, then writes it to
    ``folder``/finished."""

    category = "testing"
    output_node = True
    cacheable = False
    label = String(default="a")
    folder = String(default="")
    outputs = ()

    def run(self, ctx, label, folder):
        where = Path(folder)
        with open(where / "started", "a") as f:
            f.write(label + "\n")
        while not (where / "open").exists():
            ctx.check_cancelled()  # a stopping server cancels the run here
            time.sleep(0.02)
        with open(where / "finished", "a") as f:
            f.write(label + "\n")
        return NodeOutput((), {"label": [label]})


NODES = [Gate]
