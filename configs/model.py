"""A model with its runtime, mesh and sharding rules (the forward demo, tests, tools).

Variants (`configs/model.py:NAME`): any preset of mmjax.models.presets (tiny, llava15_7b,
llava15_13b, siglip_qwen2_7b, llava_1b, ...). GPU / TPU runtimes: `llava15_7b_gpu`,
`llava15_7b_tpu` show the settings that matter there.
"""
import ml_collections

from configs import common


def get_config(arg=None):
    name = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.runtime = common.runtime()
    c.mesh = common.mesh()
    c.logical_axis_rules = common.logical_axis_rules()
    if name.endswith("_gpu"):
        name = name[:-4]
        c.runtime.update(dtype="bfloat16", attention_impl="cudnn", remat_policy="save_qkv_context",
                         scan_layers=True)
    elif name.endswith("_tpu"):
        name = name[:-4]
        c.runtime.update(dtype="bfloat16", attention_impl="splash", remat_policy="save_qkv_context",
                         scan_layers=True)
    c.model = name
    return c
