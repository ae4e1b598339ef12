"""Peak host memory of exporting a large run to Hugging Face.

    python -m mmjax.benchmarks.export_memory [--preset llava_1b] [--dir D]

Builds a work dir holding the preset's real shapes in bf16 (a synthetic HF checkpoint,
imported, saved with Orbax as a run's checkpoint, with model.json and a small tokenizer),
then exports it in a fresh process (`mmjax.hf.export`, bf16) and prints that process's peak
RSS above its baseline next to the size of the weights and of the largest tensor: a
streaming export needs about one tensor (plus the module it belongs to), not the model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmjax.benchmarks.import_memory import write_checkpoint
from mmjax.data.tokenizer_training import train_bpe_tokenizer
from mmjax.export import export
from mmjax.hf import load
from mmjax.models import presets
from mmjax.models.config import RuntimeConfig
from mmjax.training import model_spec
from mmjax.training.config import TrainConfig


def make_workdir(preset: str, root: Path) -> tuple[Path, int, int]:
    """A run's work dir with the preset's shapes; returns it, weight bytes, largest tensor."""
    import dataclasses

    import jax
    import orbax.checkpoint as ocp

    cfg = presets.get(preset)
    write_checkpoint(cfg, root / "hf")
    rt = RuntimeConfig(dtype="bfloat16", param_dtype="bfloat16")
    params = load(root / "hf", rt).params
    leaves = jax.tree_util.tree_leaves(params)
    total, largest = sum(x.nbytes for x in leaves), max(x.nbytes for x in leaves)
    work = root / "run"
    manager = ocp.CheckpointManager((work / "checkpoints").absolute())
    manager.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"params": params})))
    manager.wait_until_finished()
    manager.close()
    del params, leaves
    tc = TrainConfig(model=preset, runtime=rt)
    (work / "config.json").write_text(json.dumps(dataclasses.asdict(tc)))
    tok = train_bpe_tokenizer(["a photo of a cat"] * 10, 300, root / "tok")
    model_spec.save(model_spec.ModelSpec(cfg, tok, "vicuna_v1"), work)
    return work, total, largest


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    # VmHWM belongs to this address space; getrusage's ru_maxrss would carry over the
    # parent's peak across fork + exec (the parent holds the whole model here)
    return _status_mib("VmHWM")


def export_and_measure(workdir: str, out: str) -> dict:
    """Runs in the child process."""
    import jax

    jax.numpy.zeros(1).block_until_ready()
    import orbax.checkpoint  # noqa: F401
    import transformers as tf

    # the libraries the export uses, loaded before the baseline: the figure is the data's
    _ = (tf.LlavaProcessor, tf.CLIPImageProcessor, tf.LlavaConfig, tf.GenerationConfig)

    base = _rss_mib()
    t = time.time()
    export(workdir, out, dtype="bfloat16", say=lambda _: None)
    peak = _peak_mib()
    return {"baseline_rss_mib": base, "peak_rss_mib": peak, "seconds": time.time() - t}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llava_1b")
    parser.add_argument("--dir", default=None, help="where to write (a temp dir)")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(export_and_measure(*args.child)))
        return {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t = time.time()
        work, total, largest = make_workdir(args.preset, Path(tmp))
        print(f"{args.preset} run: {total / 2**30:.2f} GiB bf16, largest tensor "
              f"{largest / 2**20:.0f} MiB ({time.time() - t:.0f}s to build)")
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
        out = subprocess.run([sys.executable, "-m", "mmjax.benchmarks.export_memory",
                              "--child", str(work), str(Path(tmp) / "exported")],
                             capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        written = sum(f.stat().st_size for f in (Path(tmp) / "exported").glob("*.safetensors"))
    rise = r["peak_rss_mib"] - r["baseline_rss_mib"]
    print(f"exported {written / 2**30:.2f} GiB in {r['seconds']:.0f}s")
    print(f"  RSS before export  {r['baseline_rss_mib']:9.0f} MiB")
    print(f"  peak RSS           {r['peak_rss_mib']:9.0f} MiB")
    print(f"  peak - baseline    {rise:9.0f} MiB = {rise * 2**20 / total:.3f} x weights, "
          f"{rise * 2**20 / largest:.2f} x the largest tensor")
    return r


if __name__ == "__main__":
    main()
