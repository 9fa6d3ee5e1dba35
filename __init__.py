"""ComfyUI-GRN: GRN (Generative Refinement Networks) nodes for ComfyUI.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint`` (V3 node schema); ``WEB_DIRECTORY`` serves
the refinement widget. Outside ComfyUI (pytest imports this file as the parent package of ``tests``, or someone
imports the folder) nothing is registered and nothing fails: the library ``grn_core`` stays usable on its own.
"""

import os
import sys

WEB_DIRECTORY = "./web"

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    # ComfyUI puts custom_nodes/ on the path, not this folder: make ``import grn_core`` work when the library is
    # not pip-installed. Appended, so this folder never shadows ComfyUI's own top-level modules (our node package
    # is ``grn_nodes``, not ComfyUI's ``nodes``, and is imported relatively).
    sys.path.append(_ROOT)

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI >= 0.3.48)
except ImportError:
    _IN_COMFYUI = False
else:
    _IN_COMFYUI = True

if _IN_COMFYUI:
    from .grn_nodes.comfy_nodes import comfy_entrypoint  # noqa: E402

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
else:
    __all__ = ["WEB_DIRECTORY"]
