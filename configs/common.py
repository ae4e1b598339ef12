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


def training(stage: int) -> ml_collections.ConfigDict:
    """The LLaVA-1.5 recipe for a stage (DESIGN.md section 2); variants override fields."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.model = "llava15_7b"
    c.runtime = runtime(dtype="bfloat16", remat_policy="save_qkv_context")
    c.mesh = mesh()  # per slice (TPU) / per granule; * mesh_dcn = the whole mesh
    c.mesh_dcn = mesh(fsdp=1)  # across TPU slices or GPU hosts (multi-slice: data=#slices)
    c.mesh_granule = "auto"  # auto | slice | process: what a DCN granule is
    c.logical_axis_rules = logical_axis_rules()
    c.seed = 0
    # Multi-host start-up (mmjax.distributed): auto detects Cloud TPU VMs, SLURM, Open MPI.
    c.distributed = ml_collections.ConfigDict(dict(
        mode="auto", coordinator_address="", num_processes=0, process_id=-1,
        initialization_timeout=300))
    # Where weights come from (local directories; see README "Hugging Face weights").
    c.init = ml_collections.ConfigDict(dict(
        hf_llava="",  # a whole LlavaForConditionalGeneration checkpoint, or:
        hf_vision="",  # CLIPVisionModel / SiglipVisionModel dir
        hf_llm="",  # LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM dir
        stage1_checkpoint="",  # stage 2: a stage-1 work dir (or its checkpoints/ dir)
        stage1_parts=("projector",),  # what stage 2 takes from stage 1
        random=False,  # demo: random init instead of HF weights
    ))
    c.tokenizer = ""  # tokenizer dir; default: hf_llava or hf_llm
    c.data = ml_collections.ConfigDict(dict(
        sources=[],  # [{"kind": "llava_json", "path": ..., "image_root": ..., "weight": 1.0}]
        template="plain" if stage == 1 else "vicuna_v1",
        max_length=2048, packing="pad", workers=8, max_images_per_row=0,
        max_bad_share=0.01, image_aspect="pad"))
    c.batch_size = 256 if stage == 1 else 128  # global, across processes and accumulation
    c.grad_accum = 1
    c.num_epochs = 1
    c.total_steps = 0  # 0: num_epochs over the data
    lr = 1e-3 if stage == 1 else 2e-5
    c.optim = ml_collections.ConfigDict(dict(
        groups=[("projector/.*", lr), (".*", None)] if stage == 1 else
        [("vision_tower/.*", None), ("projector/.*", lr), ("language_model/.*", lr)],
        warmup_ratio=0.03, weight_decay=0.0, grad_clip=1.0, schedule="cosine"))
    # LoRA for stage 2 (LLaVA-1.5's LoRA recipe); enabled, it replaces optim.groups with
    # adapters at lr and the projector at projector_lr, everything else frozen.
    c.lora = ml_collections.ConfigDict(dict(
        enabled=False, rank=128, alpha=256.0, dropout=0.05, lr=2e-4, projector_lr=2e-5,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    c.checkpoint = ml_collections.ConfigDict(dict(
        save_interval=500, keep_last=2, keep_every=0, async_save=True))
    c.metrics = ml_collections.ConfigDict(dict(
        tensorboard=True,  # event files in WORKDIR/tensorboard
        wandb_project="", wandb_name="",  # set a project to log to Weights & Biases
        peak_tflops=0.0,  # per-device peak for MFU; 0: known accelerators from a table
    ))
    c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=0))  # jax.profiler
    c.log_every = 10
    c.log_sample_ids = False  # write each step's sample ids to samples.jsonl (debugging)
    c.max_skipped_in_a_row = 5
    c.eval = ml_collections.ConfigDict(dict(qa_file="", image_root="", template=""))
    return c


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
    c.init.stage1_parts = ("vision_tower", "projector", "language_model")
    c.tokenizer = f"{workdir_data}/tokenizer"
    split = "captions" if stage == 1 else "instruct"
    c.data.sources = [{"kind": "llava_json", "path": f"{workdir_data}/train_{split}.json",
                       "image_root": workdir_data, "weight": 1.0}]
    c.data.template = "plain" if stage == 1 else "vicuna_v1"
    c.data.max_length = 64 if stage == 1 else 160
    c.data.packing = "first_fit"
    c.data.max_images_per_row = 3 if stage == 1 else 2
    c.data.workers = 0
    c.data.max_bad_share = 0.0
    c.batch_size = 16
    c.num_epochs = 0
    # A tiny transformer from scratch first fits the captions' text (0.54 nats/token) and
    # only then learns to read the image (measured: the break-through comes after ~250
    # steps at lr 1e-3), so stage 1 gets enough steps at a moderate rate.
    c.total_steps = 800 if stage == 1 else 400
    lr = 1e-3
    c.optim.groups = ([(".*", lr)]
                      if stage == 1 else
                      [("vision_tower/.*", None), ("projector/.*", lr), ("language_model/.*", lr)])
    c.optim.warmup_ratio = 0.05
    c.checkpoint.save_interval = 100
    c.log_every = 50
    c.eval.qa_file = f"{workdir_data}/heldout_qa.json"
    c.eval.image_root = workdir_data
    c.eval.template = "vicuna_v1"
    return c
