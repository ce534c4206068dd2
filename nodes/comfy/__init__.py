"""ComfyUI workflows in nodegraph: this library's ``comfy`` member (``nodegraph.library.Library.comfy``).

- ``widget_names(class_type)``: a ComfyUI core node type's widget names in the editor's ``widgets_values`` order
  (``schemas``), for ``nodegraph.comfy_format.ui_to_api``;
- ``to_workflow(api, ui=None, settings=None)``: a ComfyUI API prompt as our Workflow, ComfyUI node ids kept
  (``mapping``); everything unsupported refused at once;
- ``to_api(workflow)``: our workflow in ComfyUI's API format, for the node types that map back (``export``).
"""

from .export import to_api
from .mapping import to_workflow
from .schemas import SCHEMAS, widget_names

__all__ = ["SCHEMAS", "to_api", "to_workflow", "widget_names"]
