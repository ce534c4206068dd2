"""The node library: every node type nodegraph ships. Diffusion knowledge lives here, one module per family.

``NODES`` lists the node classes; ``configure(settings)`` receives the command line's settings (models folder,
device, dtype) before anything runs.
"""

from __future__ import annotations

from . import primitives
from .settings import configure

NODES = [*primitives.NODES]

__all__ = ["NODES", "configure"]
