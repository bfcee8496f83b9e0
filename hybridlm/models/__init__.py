from hybridlm.models.config import AttentionConfig, ModelConfig, SSMConfig
from hybridlm.models.hybrid_lm import HybridLM

__all__ = ["HybridLM", "ModelConfig", "SSMConfig", "AttentionConfig"]
