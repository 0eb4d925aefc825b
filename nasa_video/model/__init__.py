from .cache import PromptEmbeddings, SelfAttentionCache, TextCache
from .causal_wan import CausalWanTransformer, block_causal_mask
from .interface import (ARCHITECTURES, Architecture, Generator, architecture, build_from_config, empty_from_config,
                        generator_section, parameter_count, register_architecture)

__all__ = ["ARCHITECTURES", "Architecture", "CausalWanTransformer", "Generator", "PromptEmbeddings",
           "SelfAttentionCache", "TextCache", "architecture", "block_causal_mask", "build_from_config",
           "empty_from_config", "generator_section", "parameter_count", "register_architecture"]
