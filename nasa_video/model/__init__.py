from .cache import SelfAttentionCache, TextCache
from .causal_wan import CausalWanTransformer, block_causal_mask

__all__ = ["CausalWanTransformer", "SelfAttentionCache", "TextCache", "block_causal_mask"]
