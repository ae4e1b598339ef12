"""Shared config pieces: runtime defaults, the mesh and the logical-axis rules."""
import ml_collections

from mmjax.sharding import DEFAULT_RULES


def runtime(**overrides) -> ml_collections.ConfigDict:
    """How the networks run (mmjax.models.RuntimeConfig)."""
    c = ml_collections.ConfigDict(dict(
        dtype="float32",  # activations and matmuls; 'bfloat16' on TPU / GPU
        param_dtype="float32",  # master parameters
        attention_impl="reference",  # reference | xla | cudnn (NVIDIA) | splash (TPU)
        remat_policy="none",  # none | full | save_dots | save_qkv | save_qkv_context[_mlp]
        scan_layers=False,
    ))
    c.update(overrides)
    return c


def mesh(**sizes) -> ml_collections.ConfigDict:
    """Mesh axis sizes; one may be -1 (all remaining devices)."""
    return ml_collections.ConfigDict(dict({"data": 1, "fsdp": -1, "tensor": 1}, **sizes))


def logical_axis_rules():
    """Logical axis name -> mesh axis (or tuple of axes, or None = replicated)."""
    return [list(rule) for rule in DEFAULT_RULES]
