"""grn_core — a standalone PyTorch implementation of GRN (Generative Refinement Networks).

No ComfyUI import anywhere in this package: the ComfyUI nodes in ``grn_nodes/`` are thin adapters over it.
Data flows one way: prompt -> text features -> refiner + sampler -> bit map -> tokenizer decode -> frames.
"""

__version__ = "0.1.0"
