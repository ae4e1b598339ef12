"""The runtime choices that depend on the platform, made in one place.

Training (`mmjax.training.run.StepSetup`), the ahead-of-time compile (`mmjax.aot`),
generation (`mmjax.inference.load`) and evaluation during training all call `resolve`: an
`auto` attention kernel becomes the platform's (`attention.resolve_impl`: splash on TPU, cuDNN
on NVIDIA GPUs in bfloat16 / float16, xla elsewhere) and an `auto` remat policy the
platform's (`remat.AUTO`). `for_inference` is the runtime generation runs: the same kernel
choice, no remat, layers unscanned, in the inference dtype.
"""
from __future__ import annotations

import dataclasses

import jax

from mmjax.models.attention import resolve_impl
from mmjax.models.config import RuntimeConfig
from mmjax.models.remat import resolve_policy


def resolve(rt: RuntimeConfig, device: jax.Device) -> RuntimeConfig:
    """`rt` with its `auto` kernel and remat policy made concrete for `device`'s platform
    (a real device, or a compile-only one from `jax.experimental.topologies`)."""
    kind = getattr(device, "device_kind", "")
    return dataclasses.replace(
        rt, attention_impl=resolve_impl(rt.attention_impl, rt.dtype, device.platform, kind),
        remat_policy=resolve_policy(rt.remat_policy, device.platform))


def default_dtype(device: jax.Device) -> str:
    """The inference dtype when none is asked for: float32 on CPU, bfloat16 elsewhere."""
    return "float32" if device.platform == "cpu" else "bfloat16"


def for_inference(device: jax.Device, dtype: str | None = None,
                  trained: RuntimeConfig | None = None, keep_lora: bool = False
                  ) -> RuntimeConfig:
    """The runtime generation and evaluation run on `device`: the trained runtime's attention
    choice (`auto` when there is none) resolved as training resolves it, in `dtype`
    (default: `default_dtype`), unscanned, no remat, no LoRA dropout; the trained adapters
    kept unmerged when `keep_lora`."""
    trained = trained or RuntimeConfig()
    dtype = dtype or default_dtype(device)
    impl = trained.attention_impl
    if impl == "cudnn" and dtype not in ("bfloat16", "float16"):
        impl = "auto"  # a bfloat16 run's kernel choice, generating in float32
    rt = RuntimeConfig(dtype=dtype, param_dtype=dtype, attention_impl=impl, remat_policy="none",
                       scan_layers=False)
    if keep_lora and trained.lora_rank:
        rt = dataclasses.replace(rt, lora_rank=trained.lora_rank, lora_alpha=trained.lora_alpha,
                                 lora_targets=trained.lora_targets)
    return resolve(rt, device)
