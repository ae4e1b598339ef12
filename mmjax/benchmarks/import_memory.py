"""Peak host memory of importing a large synthetic HF checkpoint.

    python -m mmjax.benchmarks.import_memory [--preset llava_1b] [--dtype bfloat16] [--dir D]

Writes a random LLaVA checkpoint of the preset's real shapes as sharded safetensors (streamed
to disk one tensor at a time, hub key layout, bf16), then imports it in a fresh process and
prints that process's peak RSS next to the size of the imported weights. On CPU the
"device" arrays live in host memory, so the ideal peak is baseline + one copy of the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mmjax.hf import load
from mmjax.hf.config import hf_config_object
from mmjax.models import presets
from mmjax.models.config import RuntimeConfig


def _hf_tensor_shapes(cfg) -> dict[str, tuple[int, ...]]:
    import torch
    import transformers as tf

    with torch.device("meta"):
        model = tf.LlavaForConditionalGeneration(hf_config_object(cfg))
    return {k: tuple(p.shape) for k, p in model.state_dict().items()}


def write_checkpoint(cfg, directory: Path, shard_bytes: int = 2 << 30) -> int:
    """Streams random bf16 tensors into `model-0000k-of-N.safetensors` files; returns bytes."""
    import ml_dtypes

    directory.mkdir(parents=True, exist_ok=True)
    shapes = _hf_tensor_shapes(cfg)
    shards, current, size = [], [], 0
    for key, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += n
    shards.append(current)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in keys:
            n = int(np.prod(shapes[key])) * 2
            header[key] = {"dtype": "BF16", "shape": list(shapes[key]),
                           "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[key] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for key in keys:
                count = int(np.prod(shapes[key]))
                for start in range(0, count, 1 << 24):  # 16M values at a time
                    chunk = rng.standard_normal(min(1 << 24, count - start), np.float32) * 0.02
                    f.write(chunk.astype(ml_dtypes.bfloat16).tobytes())
        total += offset
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    hf_cfg = hf_config_object(cfg).to_dict()
    hf_cfg["architectures"] = ["LlavaForConditionalGeneration"]
    (directory / "config.json").write_text(json.dumps(hf_cfg))
    return total


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def import_and_measure(directory: str, dtype: str) -> dict:
    """Runs in the child process: import, then report memory figures as JSON."""
    import jax

    jax.numpy.zeros(1).block_until_ready()
    base = _rss_mib()
    t = time.time()
    imported = load(directory, RuntimeConfig(dtype=dtype, param_dtype=dtype))
    leaves = jax.tree_util.tree_leaves(imported.params)
    jax.block_until_ready(leaves)
    weights = sum(x.size * x.dtype.itemsize for x in leaves) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"params": int(sum(x.size for x in leaves)), "weights_mib": weights,
            "baseline_rss_mib": base, "peak_rss_mib": peak, "after_rss_mib": _rss_mib(),
            "seconds": time.time() - t}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llava_1b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (temp dir)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(import_and_measure(args.child, args.dtype)))
        return {}

    cfg = presets.get(args.preset)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t = time.time()
        nbytes = write_checkpoint(cfg, Path(tmp))
        print(f"wrote {args.preset} checkpoint: {nbytes / 2**30:.2f} GiB bf16 "
              f"in {time.time() - t:.0f}s")
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
        out = subprocess.run([sys.executable, "-m", "mmjax.benchmarks.import_memory",
                              "--child", tmp, "--dtype", args.dtype],
                             capture_output=True, text=True, env=env, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    extra = r["peak_rss_mib"] - r["baseline_rss_mib"] - r["weights_mib"]
    print(f"imported {r['params'] / 1e9:.2f}B parameters as {args.dtype} in {r['seconds']:.0f}s")
    print(f"  weights            {r['weights_mib']:9.0f} MiB")
    print(f"  RSS before import  {r['baseline_rss_mib']:9.0f} MiB")
    print(f"  peak RSS           {r['peak_rss_mib']:9.0f} MiB")
    print(f"  peak - baseline    {r['peak_rss_mib'] - r['baseline_rss_mib']:9.0f} MiB "
          f"= {(r['peak_rss_mib'] - r['baseline_rss_mib']) / r['weights_mib']:.3f} x weights "
          f"(transient beyond one copy: {extra:.0f} MiB)")
    return r


if __name__ == "__main__":
    main()
