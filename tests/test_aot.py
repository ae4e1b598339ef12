"""The TPU path, compiled by TPU's own compiler without a TPU (libtpu from the `tpu` extra):
the tiny model's stage-1, stage-2 and LoRA train steps through `python -m mmjax.aot` as the
stage recipes set them up for TPU (splash attention in a shard_map, scanned layers, the TPU
remat policy, chunked loss, best-fit packing) for a 4-chip v5p and an 8-chip v5e slice, and
the vision tower's forward and backward with splash at LLaVA's 577 and SigLIP's 729 tokens.
"""
import dataclasses
import os

import jax
import numpy as np
import pytest

from mmjax import aot
from mmjax.models.config import RuntimeConfig, VisionConfig
from mmjax.models.factory import abstract_variables
from mmjax.models.vision import VisionTower
from mmjax.sharding import LOGICAL_AXIS_RULES, logical_shardings, make_mesh, mesh_rules, plain
from mmjax.training.config import from_config

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
TINY = ["--config.model=tiny", "--config.batch_size=16", "--config.data.max_length=256"]


@pytest.fixture(autouse=True)
def quick_compiles():
    """TPU's compiler at its lowest execution-time effort (about 30% faster to compile;
    the programs are the same, scheduled with less search), for this module only."""
    before = jax.config.jax_exec_time_optimization_effort
    jax.config.update("jax_exec_time_optimization_effort", -1.0)
    yield
    jax.config.update("jax_exec_time_optimization_effort", before)


def _compile(capsys, *argv):
    status = aot.main(list(argv))
    out = capsys.readouterr().out
    return status, out


# the command end to end for two chip generations; v5p-8 in the fast tier, v5e-8 (the same
# path on 8 single-core chips) with the end-to-end tests
@pytest.mark.parametrize("topology, devices", [
    ("v5p-8", 4), pytest.param("v5e-8", 8, marks=pytest.mark.e2e)])
def test_tiny_stage_steps_compile_for_tpu(capsys, topology, devices):
    for config, extra in [("configs/stage1.py", ["--no-fixed"]),
                          ("configs/stage2.py", ["--no-fixed"]),
                          ("configs/stage2.py:auto_lora", ["--no-fixed"])]:
        status, out = _compile(capsys, "--config", config, "--topology", topology, *TINY,
                               *extra)
        assert status == 0, out
        assert (f"attention splash, remat save_qkv, scan True, loss chunk 512; mesh "
                f"{{'data': 1, 'fsdp': -1, 'tensor': 1}} on {devices} x {topology}") in out
        assert "packing best_fit" in out and "-> fits" in out
        temps = float(out.split("temporaries")[1].split("GiB")[0])
        assert 0 < temps < 1, out


def test_an_any_resolution_step_compiles_for_tpu(capsys):
    """LLaVA-NeXT's layout (views per image slot, the features gathered by image_sources)
    through TPU's compiler: the tiny model on its grids, stage 2 with packing."""
    status, out = _compile(capsys, "--config", "configs/stage2.py", "--topology", "v5p-8",
                           *TINY, "--config.llava.aspect=anyres",
                           "--config.data.image_aspect=anyres", "--no-fixed")
    assert status == 0, out
    assert "-> fits" in out and "packing best_fit" in out


@pytest.mark.parametrize("mu_dtype, moments", [("float32", 8), ("bfloat16", 6)])
def test_the_fixed_part_is_the_state_and_the_gradient_buffers(capsys, mu_dtype, moments):
    """`mmjax.aot` reports the fixed part per trainable parameter: the train state measured
    by the compiler (here the local CPU devices': TPU pads the tiny model's 64-wide arrays to
    its 128 lanes) is 4 bytes of parameter and `moments` bytes of Adam moments per trainable
    parameter plus the frozen weights (optim.mu_dtype=bfloat16 saves 2), and the buffers at
    least one float32 gradient."""
    status, out = _compile(capsys, "--config", "configs/stage2.py", *TINY,
                           "--config.runtime.dtype=float32",
                           f"--config.optim.mu_dtype={mu_dtype}")
    assert status == 0, out
    fixed = out.split("fixed part")[1]
    trainable = int(fixed.split("(")[1].split(" trainable")[0].replace(",", ""))
    frozen = int(fixed.split(" trainable, ")[1].split(" frozen")[0].replace(",", ""))
    state = float(fixed.split("state")[1].split("GiB:")[1].split("B/param")[0])
    buffers = float(fixed.split("buffers")[1].split("GiB:")[1].split("B/param")[0])
    expected = 4 + moments + 4 * frozen / trainable
    assert expected * 0.99 <= state <= expected * 1.05, out
    assert buffers >= 4, out
    assert "activations" in out


def test_target_names_and_errors():
    t = aot.Target.parse("v5p-64")
    assert (t.topology, t.chip_config, round(t.hbm / aot.GiB, 2)) == ("v5:2x4x4", "megacore",
                                                                      95.74)
    assert aot.Target.parse("v5e-256").topology == "v5e:16x16"
    assert aot.Target.parse("v4-8").topology == "v4:2x2x1"
    assert len(aot.Target.parse("v5p-512").devices()) == 256
    with pytest.raises(aot.UsageError, match="v5p-12: no v5p slice of that size; sizes: "
                                             "v5p-8, v5p-16"):
        aot.Target.parse("v5p-12")
    with pytest.raises(aot.UsageError, match="unknown accelerator type 'tpu-8'"):
        aot.Target.parse("tpu-8")


def test_large_slice_takes_any_mesh_that_divides_it():
    """v5p-512 (4x8x8): tensor=2 maps onto no whole physical axis; the mesh splits one."""
    devices = aot.Target.parse("v5p-512").devices()
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 2}, devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 128, "tensor": 2}
    assert len(set(d.id for d in mesh.devices.flat)) == 256
    with pytest.raises(ValueError, match="needs 384 devices"):
        make_mesh({"data": 3, "fsdp": 64, "tensor": 2}, devices)


@pytest.mark.parametrize("family, image_size, tokens", [("clip", 336, 577),
                                                         ("siglip", 384, 729)])
def test_vision_tower_compiles_with_splash_at_real_lengths(family, image_size, tokens):
    """The tower at its real token count (not a multiple of 128) with the TPU kernel: its
    forward and gradients, sharded over a v5p-8's 4 chips."""
    heads = {"clip": 64, "siglip": 72}[family]  # CLIP-L's and SigLIP so400m's head dim
    cfg = VisionConfig(family=family, image_size=image_size, patch_size=14,
                       hidden_size=2 * heads, intermediate_size=256, num_layers=2, num_heads=2)
    assert cfg.num_patches + cfg.has_cls == tokens
    rt = RuntimeConfig(dtype="bfloat16", attention_impl="splash", scan_layers=True,
                       remat_policy="save_qkv_context")
    tower = VisionTower(cfg, rt, keep=(2,))
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, aot.Target.parse("v5p-8").devices())
    boxed = abstract_variables(cfg, rt)["params"]
    sh = logical_shardings(boxed, mesh, LOGICAL_AXIS_RULES)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          plain(boxed), sh)
    pixels = jax.ShapeDtypeStruct((8, image_size, image_size, 3), np.float32,
                                  sharding=jax.sharding.NamedSharding(
                                      mesh, jax.sharding.PartitionSpec("fsdp")))

    def loss(p, x):
        return tower.apply({"params": p}, x).astype(np.float32).mean()

    with mesh_rules(mesh, LOGICAL_AXIS_RULES):
        lowered = jax.jit(jax.value_and_grad(loss)).lower(params, pixels)
        text = lowered.as_text()
        compiled = lowered.compile()
    assert "tpu_custom_call" in text  # the Mosaic kernel, not XLA's attention
    assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_auto_grad_accum_follows_the_devices():
    """grad_accum=0 (the recipes): micro-batches of at most max_rows_per_device rows per
    device, the fewest that split evenly."""
    from mmjax import configlib

    tc = from_config(configlib.load("configs/stage2.py:llava15_7b"))
    assert tc.grad_accum == 0 and tc.batch_size == 128
    for topology, accum in [("v5p-8", 4), ("v5p-64", 1), ("v5e-16", 1)]:
        mesh = make_mesh(dict(tc.mesh), aot.Target.parse(topology).devices())
        assert tc.for_mesh(mesh).grad_accum == accum, topology
    mesh = make_mesh(dict(tc.mesh), aot.Target.parse("v5p-8").devices())
    assert dataclasses.replace(tc, max_rows_per_device=16).for_mesh(mesh).grad_accum == 2
