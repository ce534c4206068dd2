"""nodegraph: a typed node-graph engine. It validates, plans, caches and runs graphs of any typed nodes; it knows
nothing of diffusion (that lives in the ``nodes`` package).

From Python:

```python
import nodegraph
settings = nodegraph.Settings.from_env(models_dir="~/models", output_dir="out")
engine = nodegraph.Executor(nodegraph.build_registry(), settings=settings)
wf = nodegraph.load("workflows/text-to-image.json")
wf.set("5", "seed", 7)
result = engine.run(wf)
image = result.output("8", "image")
```
"""

from .cache import ResultCache, file_identity
from .events import Event, EventBus
from .executor import Cancelled, Executor, NodeRecord, RunContext, RunResult
from .folders import Folder
from .library import Library, NoLibrary, load_library
from .node import Node, NodeDefinitionError, NodeOutput
from .registry import Registry, RegistryError, build_registry
from .settings import Settings
from .spec import ANY, Boolean, Choices, Combo, Float, Int, ListOf, Output, Socket, String
from .validate import Plan, ValidationError, ValidationFailed, compile_workflow
from .workflow import Limits, Link, Workflow, WorkflowError, load, loads

__version__ = "0.1.0"

__all__ = [
    "ANY", "Boolean", "Cancelled", "Choices", "Combo", "Event", "EventBus", "Executor", "Float", "Folder", "Int",
    "Library", "Limits", "Link", "ListOf", "NoLibrary", "Node", "NodeDefinitionError", "NodeOutput", "NodeRecord",
    "Output", "Plan", "Registry", "RegistryError", "ResultCache", "RunContext", "RunResult", "Settings", "Socket",
    "String", "ValidationError", "ValidationFailed", "Workflow", "WorkflowError", "build_registry",
    "compile_workflow", "file_identity", "load", "load_library", "loads",
]
