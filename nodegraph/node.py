"""The node contract: a node type is a small class whose declared inputs and outputs are its whole interface.

```python
class Add(Node):
    "Add two numbers."
    category = "math"
    a = Int(default=0)
    b = Int(default=0)
    outputs = (Output("sum", "INT"),)

    def run(self, ctx, a, b):
        return a + b
```

The validator, the executor, the CLI and the canvas all read the same declaration; nothing is written twice.
A node is a pure function of its inputs: the executor owns ordering, caching and progress. Values on links are
shared with the cache, so ``run`` must never change its inputs in place; it returns new values instead.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

from .spec import InputSpec, Output


class NodeDefinitionError(TypeError):
    """A node class is declared wrongly (a programming error in a node package, reported at import)."""


class Node:
    """Base class of every node type. Subclasses declare inputs as class attributes (``InputSpec`` instances).

    Class attributes a subclass may set:
      name         unique type name (default: the class name)
      display_name the title on the canvas (default: ``name``)
      category     a slash-separated path in the node palette
      version      bump it when the meaning of inputs changes; old workflows go through ``migrate``
      outputs      a tuple of ``Output``
      output_node  True for nodes that produce results for the user (files, previews); runs start from them
      cacheable    False for nodes whose result must never be reused (e.g. reading a live source)
      deprecated   True hides the node from the palette but still runs old workflows
    The docstring is the description shown as help text on the canvas.
    """

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    category: ClassVar[str] = "misc"
    version: ClassVar[int] = 1
    outputs: ClassVar[tuple[Output, ...]] = ()
    output_node: ClassVar[bool] = False
    cacheable: ClassVar[bool] = True
    deprecated: ClassVar[bool] = False

    inputs: ClassVar[dict[str, InputSpec]] = {}
    output_types: ClassVar[dict[str, str]] = {}  # output name -> type, derived from ``outputs``
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        inputs: dict[str, InputSpec] = {}
        for base in reversed(cls.__mro__[1:]):
            inputs.update(getattr(base, "inputs", {}) or {})
        for attr, value in list(vars(cls).items()):
            if isinstance(value, InputSpec):
                if attr in _RESERVED:
                    raise NodeDefinitionError(f"{cls.__name__}: an input cannot be called {attr!r} "
                                              f"(a reserved node attribute); rename it")
                inputs[attr] = value.named(attr)
        cls.inputs = inputs
        cls.output_types = {o.name: o.type for o in cls.outputs if isinstance(o, Output)}
        cls.name = vars(cls).get("name") or cls.__name__
        cls.display_name = vars(cls).get("display_name") or cls.name
        cls.description = inspect.cleandoc(cls.__doc__ or "")
        _check_declaration(cls)

    def run(self, ctx: Any, **inputs: Any) -> Any:
        """Compute the outputs. Return a tuple in ``outputs`` order, a single value when there is one output,
        a dict by output name, or ``NodeOutput`` to also publish UI results (images saved, text to show)."""
        raise NotImplementedError

    @classmethod
    def migrate(cls, from_version: int, inputs: dict[str, Any]) -> dict[str, Any]:
        """Turn inputs saved by an older ``version`` of this node into current ones (default: refuse)."""
        raise ValueError(f"version {from_version} of node type {cls.name} is no longer supported "
                         f"(current version is {cls.version}); rebuild this node")

    @classmethod
    def to_json(cls, settings: Any = None) -> dict:
        """The node type as the canvas and the API see it."""
        return {
            "name": cls.name,
            "display_name": cls.display_name,
            "category": cls.category,
            "description": cls.description,
            "version": cls.version,
            "output_node": cls.output_node,
            "deprecated": cls.deprecated,
            "inputs": [spec.to_json(settings) for spec in cls.inputs.values()],
            "outputs": [out.to_json() for out in cls.outputs],
        }


_RESERVED = frozenset(vars(Node)) | {"name", "display_name", "category", "version", "outputs", "output_node",
                                     "cacheable", "deprecated", "inputs", "output_types", "description", "run", "migrate", "to_json"}


@dataclasses.dataclass(frozen=True)
class NodeOutput:
    """What ``run`` returns when a node has UI results besides its outputs (both are cached together)."""

    values: tuple = ()
    ui: dict = dataclasses.field(default_factory=dict)


def normalise_outputs(node_type: type[Node], returned: Any) -> tuple[tuple, dict]:
    """Turn whatever ``run`` returned into (values in declared order, ui dict), checking the count."""
    ui: dict = {}
    if isinstance(returned, NodeOutput):
        returned, ui = returned.values, dict(returned.ui)
    names = [o.name for o in node_type.outputs]
    if isinstance(returned, dict):
        missing = [n for n in names if n not in returned]
        if missing:
            raise TypeError(f"{node_type.name}.run returned no value for output(s) {', '.join(missing)}")
        values = tuple(returned[n] for n in names)
    elif len(names) == 1 and not (isinstance(returned, tuple) and len(returned) == 1):
        values = (returned,)
    elif returned is None and not names:
        values = ()
    else:
        values = tuple(returned) if isinstance(returned, (tuple, list)) else (returned,)
    if len(values) != len(names):
        raise TypeError(f"{node_type.name}.run returned {len(values)} value(s) for {len(names)} declared output(s)")
    return values, ui


def _check_declaration(cls: type[Node]) -> None:
    seen: set[str] = set()
    for out in cls.outputs:
        if not isinstance(out, Output):
            raise NodeDefinitionError(f"{cls.name}: outputs must be Output(...) instances, got {out!r}")
        if out.name in seen:
            raise NodeDefinitionError(f"{cls.name}: two outputs are named {out.name!r}")
        seen.add(out.name)
    if not isinstance(cls.version, int) or cls.version < 1:
        raise NodeDefinitionError(f"{cls.name}: version must be a positive integer")
    if cls.run is not Node.run:
        params = inspect.signature(cls.run).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [n for n in cls.inputs if n not in params and not takes_all]
        if unknown:
            raise NodeDefinitionError(f"{cls.name}.run does not accept input(s) {', '.join(unknown)}")
