"""Data: corpora (stdlib / files / hub), synthetic tasks (mqar, copy, passkey), tokenizers, the DataModule."""
from hybridlm.data.config import DataConfig, SyntheticConfig
from hybridlm.data.datamodule import HybridDataModule
from hybridlm.data.synthetic import PasskeyPrompt, passkey_prompt
from hybridlm.data.tokenizers import Tokenizer, load_tokenizer

__all__ = ["DataConfig", "SyntheticConfig", "HybridDataModule", "PasskeyPrompt", "passkey_prompt", "Tokenizer",
           "load_tokenizer"]
