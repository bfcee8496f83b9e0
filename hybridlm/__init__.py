"""hybridlm: training framework for hybrid Mamba-2 / attention language models, built to study long context."""
__version__ = "0.1.0"
