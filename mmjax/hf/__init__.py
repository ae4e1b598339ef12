"""Hugging Face interop: local checkpoint import (safetensors), configs, tokenizer, verify."""
from mmjax.hf.loader import Imported, load
from mmjax.hf.tokenizer_files import check_written, load_tokenizer, save_tokenizer
from mmjax.hf.weight_files import Checkpoint, CheckpointError

__all__ = ["Checkpoint", "CheckpointError", "Imported", "check_written", "load", "load_tokenizer",
           "save_tokenizer"]
