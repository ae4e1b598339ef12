"""Hugging Face interop: local checkpoint import (safetensors), configs, tokenizer, verify."""
from mmjax.hf.checkpoint import Checkpoint, CheckpointError
from mmjax.hf.loader import Imported, load, load_tokenizer

__all__ = ["Checkpoint", "CheckpointError", "Imported", "load", "load_tokenizer"]
