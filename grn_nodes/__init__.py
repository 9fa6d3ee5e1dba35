"""ComfyUI nodes of ComfyUI-GRN.

``logic`` (the work, plain Python over grn_core), ``model_files`` (model folders, file lists, downloads),
``widget_events`` (the per-step widget message) import no ComfyUI module and are unit-tested without it;
``comfy_nodes`` holds the V3 node classes and is imported only by the pack's ``__init__`` inside ComfyUI.
"""
