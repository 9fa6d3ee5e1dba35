"""ComfyUI nodes of ComfyUI-GRN: thin adapters that translate sockets and widgets into ``grn_core`` calls.

One small module per node family — ``loading`` (Load GRN), ``prompting`` (Encode Prompt), ``sampling`` (Refine
Sampler), ``frames`` (Decode Video, Encode Image), ``stats`` (Refine Stats) — plus ``errors`` (the node error
path), ``patching`` (our models inside ComfyUI's memory manager), ``model_files`` (model folders, file lists,
downloads) and ``widget_events`` (the per-step widget message).
None of them imports a ComfyUI module, so they are unit-tested without it; ``comfy_nodes`` holds the V3 node
classes and is imported only by the pack's ``__init__`` inside ComfyUI (and by the tests, with stand-ins).
"""
