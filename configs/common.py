"""Shared config pieces: the default logical-axis rules, mesh, runtime and the stage recipes.

The sections come from the typed dataclasses (`mmjax.configlib.defaults`), so every field of
every section is here with its default; the recipes below change only what differs.
"""
import ml_collections

from mmjax import configlib
from mmjax.errors import ConfigError
from mmjax.models.config import RuntimeConfig
from mmjax.sharding import LOGICAL_AXIS_RULES
from mmjax.training.config import TrainConfig


def runtime(**overrides) -> ml_collections.ConfigDict:
    """How the networks run (mmjax.models.RuntimeConfig)."""
    c = configlib.defaults(RuntimeConfig)
    c.update(overrides)
    return c


def mesh(**sizes) -> ml_collections.ConfigDict:
    """Mesh axis sizes (TrainConfig's defaults, changed by `sizes`); one may be -1 (all
    remaining devices)."""
    return ml_collections.ConfigDict(dict(TrainConfig().mesh, **sizes))


def logical_axis_rules() -> list:
    return [list(rule) for rule in LOGICAL_AXIS_RULES]


def training(stage: int) -> ml_collections.ConfigDict:
    """The LLaVA-1.5 recipe for a stage (DESIGN.md section 2); variants override fields."""
    c = configlib.defaults(TrainConfig)
    c.stage = stage
    # the platform's kernel and remat policy (splash on TPU, cuDNN on NVIDIA GPUs; see
    # RuntimeConfig.for_platform), scanned layers (one layer compiled, not 32)
    c.runtime.update(dtype="bfloat16", attention_impl="auto", remat_policy="auto",
                     scan_layers=True)
    c.logical_axis_rules = logical_axis_rules()
    c.data.template = "plain" if stage == 1 else "auto"  # auto: the LLM family's template
    # several samples per row: on a 665K-like mix, padding rows to 2048 wastes 62% of the
    # slots, best-fit packing 12% (mmjax.benchmarks.packing)
    c.data.packing = "best_fit"
    c.data.workers = 8
    c.data.max_bad_share = 0.01
    c.batch_size = 256 if stage == 1 else 128
    # micro-batches of at most 8 rows of 2048 tokens per device (LLaVA ran 16 per 80 GB
    # GPU with ZeRO-3): 2 on 8 GPUs, 4 on a v5p-8, 1 on a v5p-64 and up
    c.grad_accum = 0
    lr = 1e-3 if stage == 1 else 2e-5
    # stage 2: an any-resolution model's image_newline trains with the LLM, as LLaVA-NeXT's
    # mm_language_model part takes every weight outside the tower and the projector
    c.optim.groups = ([["projector/.*", lr], [".*", None]] if stage == 1 else
                      [["vision_tower/.*", None], ["projector/.*", lr],
                       ["language_model/.*", lr], ["image_newline", lr]])
    return c


def variant_error(variant: str, variants) -> ConfigError:
    return ConfigError(f"no variant {variant!r}; variants: {', '.join(variants)}")


def demo_training(stage: int, workdir_data: str = "/tmp/mmjax-demo/data"):
    """The embedded demo: tiny towers from scratch on generated shapes, a few minutes on CPU.

    Unlike CLIP and Vicuna, random towers know nothing yet, so the demo's stage 1 trains the
    ViT, the projector and the LLM on the captions; stage 2 then follows the recipe: the ViT
    is frozen and the projector and LLM are tuned on the instructions, starting from stage
    1's checkpoint.
    """
    c = training(stage)
    c.model = "demo"
    c.runtime = runtime()
    c.mesh = mesh(data=-1, fsdp=1, tensor=1)  # tiny model: data parallel over the devices
    c.init.random = True
    c.init.stage1_parts = ["vision_tower", "projector", "language_model"]
    c.tokenizer = f"{workdir_data}/tokenizer"
    split = "captions" if stage == 1 else "instruct"
    c.data.sources = [{"kind": "llava_json", "path": f"{workdir_data}/train_{split}.json",
                       "image_root": workdir_data, "weight": 1.0}]
    c.data.max_length = 64 if stage == 1 else 160
    c.data.packing = "first_fit"
    c.data.max_images_per_row = 3 if stage == 1 else 2
    c.data.workers = 0
    c.data.max_bad_share = 0.0
    c.batch_size = 16
    c.num_epochs = 0
    # A tiny transformer from scratch first fits the captions' text and only then learns to
    # read the image (measured: loss 0.57 at step 100, 0.20 from step 450 on, the rest being
    # which of six wordings a caption takes), so stage 1 gets enough steps at a moderate rate.
    c.total_steps = 800 if stage == 1 else 450
    lr = 1e-3
    c.optim.groups = ([[".*", lr]] if stage == 1 else
                      [["vision_tower/.*", None], ["projector/.*", lr], ["language_model/.*", lr],
                       ["image_newline", lr]])
    c.optim.warmup_ratio = 0.05
    c.checkpoint.save_interval = 100
    c.log_every = 50
    return c
