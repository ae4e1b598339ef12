"""Hugging Face interop: local checkpoint import (safetensors), configs, tokenizer, verify."""
from mmjax.hf.loader import Imported, load, load_tokenizer
from mmjax.hf.weight_files import Checkpoint, CheckpointError

__all__ = ["Checkpoint", "CheckpointError", "Imported", "load", "load_tokenizer"]
