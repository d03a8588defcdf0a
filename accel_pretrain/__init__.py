"""Pretrain Llama-style language models from raw text with Hugging Face Accelerate."""

__version__ = "0.1.0"
