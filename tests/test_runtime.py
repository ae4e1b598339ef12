"""One resolver of the platform's runtime choices (`mmjax.models.runtime`) for every path:
the train step, its ahead-of-time compile for a TPU slice, generation from a work dir, and
evaluation during training resolve the same attention kernel on the same platform."""
from __future__ import annotations

import jax
import pytest
from tiny_runs import demo_config, make_run

from mmjax import aot
from mmjax.evaluation.during_training import Evaluator
from mmjax.inference.load import from_checkpoint
from mmjax.models import RuntimeConfig, presets
from mmjax.models.runtime import for_inference, resolve
from mmjax.sharding import make_mesh, mesh_rules
from mmjax.training import run
from mmjax.training.init import initial_params
from mmjax.training.saved_run import SavedRun


class _Device:
    def __init__(self, platform: str, device_kind: str = ""):
        self.platform, self.device_kind = platform, device_kind


@pytest.mark.parametrize("platform, kind, dtype, attention, remat", [
    ("tpu", "TPU v5p", "bfloat16", "splash", "save_qkv"),
    ("gpu", "NVIDIA H100 80GB HBM3", "bfloat16", "cudnn", "save_qkv_context"),
    ("gpu", "NVIDIA H100 80GB HBM3", "float32", "xla", "save_qkv_context"),
    ("cpu", "cpu", "float32", "xla", "none"),
])
def test_auto_resolves_per_platform_for_training_and_generation(platform, kind, dtype,
                                                                attention, remat):
    device = _Device(platform, kind)
    trained = resolve(RuntimeConfig(dtype=dtype, attention_impl="auto", remat_policy="auto",
                                    scan_layers=True), device)
    assert (trained.attention_impl, trained.remat_policy) == (attention, remat)
    generating = for_inference(device, dtype, trained=RuntimeConfig(dtype=dtype))
    assert generating.attention_impl == attention
    assert (generating.remat_policy, generating.scan_layers) == ("none", False)
    # a bfloat16 run's cuDNN, generating in float32, falls back to the platform's choice
    assert for_inference(device, "float32", trained=RuntimeConfig(
        dtype="bfloat16", attention_impl="cudnn")).attention_impl == (
        "splash" if platform == "tpu" else "xla")


def test_tpu_slice_training_aot_and_generation_agree(demo_data):
    """On compile-only v5p-8 devices: the step `mmjax.aot` compiles (StepSetup) and what a
    work dir is generated with there resolve to splash attention."""
    tc = demo_config(demo_data)
    devices = aot.Target.parse("v5p-8").devices()
    mesh = make_mesh(tc.mesh, devices=devices)
    setup = run.StepSetup.of(tc.for_mesh(mesh), presets.get("demo"), mesh, 1)
    assert setup.rt.attention_impl == "splash"
    assert for_inference(devices[0], trained=tc.model_runtime).attention_impl == "splash"


def test_cpu_training_generation_and_evaluation_agree(demo_data, tmp_path):
    """On this machine's CPU devices: the train step, `from_checkpoint` and the in-training
    evaluator's engine run the same kernel."""
    tc = demo_config(demo_data)
    work = make_run(tmp_path / "run", tc)
    p = run.prepare(tc, tmp_path / "again", False, lambda _: None)
    m = from_checkpoint(str(work))
    assert p.setup.rt.attention_impl == m.model.rt.attention_impl == "xla"
    assert SavedRun.open(work).rt.attention_impl == "auto"  # the run saved the choice, not
    # its resolution: another platform resolves it again
    ctx = run.RunContext(p.tc, p.spec, p.data, p.setup, p.mesh, tmp_path / "again", None)
    with mesh_rules(p.mesh, p.tc.logical_axis_rules):
        params = initial_params(p.setup.model, p.tc.init, p.setup.abstract_params,
                                p.setup.param_sh, p.setup.rt, p.mesh,
                                p.tc.logical_axis_rules, 0)
    live = Evaluator(ctx).live_model(params, 1)
    assert live.model.rt.attention_impl == "xla"
    assert jax.tree.structure(live.params) == jax.tree.structure(m.params)


def test_the_engine_prefills_with_splash_on_a_v5p():
    """Generation on a TPU slice runs the kernel training runs: the engine's whole program
    (prefill of a bucketed prompt over the image and the text, then the decode loop),
    lowered for compile-only v5p-8 devices, calls the splash kernel and compiles."""
    import functools

    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from mmjax.inference import Engine, Sampling
    from mmjax.inference.sampling import knobs
    from mmjax.models import Llava
    from mmjax.models.factory import abstract_variables
    from mmjax.sharding import LOGICAL_AXIS_RULES, logical_shardings, plain, with_shardings

    devices = aot.Target.parse("v5p-8").devices()
    cfg = presets.get("demo")
    rt = for_inference(devices[0], "bfloat16")
    assert rt.attention_impl == "splash"
    mesh = make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, devices)
    boxed = abstract_variables(cfg, rt)["params"]
    params = with_shardings(plain(boxed), logical_shardings(boxed, mesh, LOGICAL_AXIS_RULES))

    class Tokens:
        pad_token_id = 0

    engine = Engine(Llava(cfg, rt), params, Tokens(), mesh=mesh, rules=LOGICAL_AXIS_RULES)
    rows, length, new = 4, 256, 16
    rows_sh = NamedSharding(mesh, PartitionSpec("data"))
    spec = lambda shape, dtype, sh=None: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)  # noqa
    size = cfg.vision.image_size
    small = lambda x: spec(np.shape(x), jnp.asarray(x).dtype)  # noqa: E731
    sampling = Sampling(max_new_tokens=new)
    args = (params, spec((rows, length), jnp.int32, rows_sh),
            spec((rows, length), jnp.int32, rows_sh),
            spec((rows, 1, size, size, 3), jnp.uint8, rows_sh), None, None,
            jax.eval_shape(lambda: jax.random.key(0)),
            jax.tree.map(small, knobs(sampling, rows)), small(jnp.int32(new)),
            small(jnp.asarray((2,), jnp.int32)), small(np.full((1, 8), -1, np.int32)))
    with mesh_rules(mesh, LOGICAL_AXIS_RULES):
        lowered = jax.jit(functools.partial(engine._run, new=new, stream=False,
                                            logprobs=False)).lower(*args)
    assert "tpu_custom_call" in lowered.as_text()  # the Mosaic splash kernel
    assert lowered.compile().memory_analysis().temp_size_in_bytes > 0
