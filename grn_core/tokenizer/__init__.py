"""The HBQ tokenizer of GRN: a causal 3-D conv VAE (Wan2.2-style) mapping RGB video/images to tanh features.

    from grn_core.tokenizer import HBQTokenizer, TokenizerConfig, infer_tokenizer_config
    tok = HBQTokenizer(infer_tokenizer_config(state_dict)); tok.load_state_dict(state_dict, strict=True)
    z = tok.encode(x)        # [B,3,T,H,W] or [B,3,H,W] in [-1,1] -> [B,d,t,h,w] in (-1,1)
    frames = tok.decode(z)   # [B,d,t,h,w] -> [B,3,T,H,W]
"""

from .causal import CausalCache
from .config import TOKENIZER_PRESETS, TokenizerConfig, infer_tokenizer_config, tokenizer_preset
from .vae import HBQTokenizer

__all__ = [
    "CausalCache",
    "HBQTokenizer",
    "TOKENIZER_PRESETS",
    "TokenizerConfig",
    "infer_tokenizer_config",
    "tokenizer_preset",
]
