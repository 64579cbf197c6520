"""llmbench: time and evaluate text generation of Hugging Face causal LMs."""

__version__ = "0.1.0"
