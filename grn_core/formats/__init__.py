"""Weight file formats beyond safetensors / torch pickles: GGUF (llama.cpp's format, as ComfyUI-GGUF users run
big models on small GPUs).

- :mod:`.gguf_quants` — the GGML block layouts: :class:`GGUFWeight` (raw blocks + type + shape), :func:`quantize`,
  :func:`dequantize` (torch, any device), the fallback rule (:func:`pick_qtype`);
- :mod:`.gguf_file` — :func:`write_gguf` (quantise + write, atomic) and :func:`read_gguf` (weights stay quantised;
  :class:`~grn_core.checkpoint_files.CheckpointError` for foreign, damaged, truncated or unsupported files);
- :mod:`.gguf_linear` — :class:`GGUFLinear` (decodes its weight per call on the compute device) and
  :func:`apply_gguf_weights` (loads a GGUF state dict into a network, quantised Linears as GGUFLinear).

The loaders take GGUF refiners like any other file — ``load_refiner("x.Q4_K.gguf", dtype="bf16")``,
``load_c2i``, ``grn_core.pipeline.load_model``, ``inspect_checkpoint``, ``python -m grn_core inspect/generate``, the
Load GRN node — and ``python -m grn_core convert SRC OUT.gguf --dtype q8_0|q5_k|q4_k|bf16|f16`` writes them. What
``grn_core.checkpoints`` does for a GGUF file (it sits above this package, which never imports it)::

    raw = read_gguf_checkpoint(path)                 # RawCheckpoint: tensors (GGUFWeight values) + grn.* metadata
    with torch.device("meta"):
        model = GRNRefiner(RefinerConfig.from_dict(raw.config_dict))
    apply_gguf_weights(model, raw.tensors, compute_dtype=torch.bfloat16, path=path)
    cast_network(model, Precision(torch.bfloat16, torch.bfloat16))   # non-GGUF weights; GGUFLinear keeps its blocks

(after the usual key, shape and config checks, and :func:`nonfinite_blocks` for NaN/Inf block scales).
"""

from .gguf_file import (
    ARCHITECTURE,
    WRITE_TYPES,
    GGUFSummary,
    checkpoint_to_gguf,
    default_select,
    is_gguf_file,
    plan_gguf,
    read_gguf,
    read_gguf_checkpoint,
    write_gguf,
)
from .gguf_linear import GGUFLinear, apply_gguf_weights, gguf_linears
from .gguf_quants import (
    FALLBACKS,
    QTYPES,
    QUANTIZABLE,
    SUPPORTED,
    GGUFWeight,
    dequantize,
    nonfinite_blocks,
    pick_qtype,
    quantize,
)

__all__ = [
    "ARCHITECTURE",
    "FALLBACKS",
    "GGUFLinear",
    "GGUFSummary",
    "GGUFWeight",
    "QTYPES",
    "QUANTIZABLE",
    "SUPPORTED",
    "WRITE_TYPES",
    "apply_gguf_weights",
    "checkpoint_to_gguf",
    "default_select",
    "dequantize",
    "gguf_linears",
    "is_gguf_file",
    "nonfinite_blocks",
    "pick_qtype",
    "plan_gguf",
    "quantize",
    "read_gguf",
    "read_gguf_checkpoint",
    "write_gguf",
]
