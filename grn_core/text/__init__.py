"""Text side of GRN: the umt5-xxl encoder, Wan's prompt cleaning and the prompt -> features wrapper.

(``hashed.py``, a tiny deterministic stand-in encoder for tests and demos, will live here too; it is imported by
its own module path, not re-exported here.)
"""

from grn_core.text.cleaning import clean_prompt
from grn_core.text.prompt_encoder import UMT5PromptEncoder
from grn_core.text.umt5 import UMT5_PRESETS, UMT5Config, UMT5Encoder, infer_umt5_config

__all__ = [
    "UMT5Config",
    "UMT5Encoder",
    "UMT5PromptEncoder",
    "UMT5_PRESETS",
    "clean_prompt",
    "infer_umt5_config",
]
