"""Will it fit? Compile the real train step for a TPU slice (or the local devices) ahead of
time, with no weights, no data and no TPU: TPU's own compiler (libtpu, the project's `tpu`
extra) runs on any machine.

    python -m mmjax.aot --config configs/stage2.py:llava15_7b --topology v5p-8 \\
        [--num-slices N] [--sweep] [--dump-hlo DIR] [--config.x=y ...]

The step is the one `mmjax.train` runs (`mmjax.train.StepSetup`: the same model, runtime
with its `auto` choices made for the target, shardings and donated state), lowered on
abstract inputs of the config's global batch. Prints per-device memory (arguments, outputs,
temporaries, code) against the chip's HBM; exit status 0 when it fits, 1 when it does not,
2 for a mistake in the command or config. `--sweep` compiles remat policies x grad_accum
values and prints what fits. Accelerator types: v4-8 ... v4-4096, v5p-8 ... v5p-8192 (the
number counts TensorCores, two per chip), v5e-1 ... v5e-256, v6e-1 ... v6e-256 (chips);
`--num-slices` for multi-slice (mesh_dcn then spans the slices).

`--config` variants without a model (`auto`) compile the model their weights describe when
init.* points at them, else the llava15_7b preset (said so in the output).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import topologies

from mmjax import batch as batch_format
from mmjax.data.pipeline import image_slots
from mmjax.errors import ConfigError, UsageError
from mmjax.models import presets
from mmjax.sharding import batch_ways, make_mesh, mesh_rules, with_shardings
from mmjax.training import model_spec
from mmjax.training.config import TrainConfig, check_batch_fits_mesh, from_file
from mmjax.training.optimizer import split
from mmjax.training.run import StepSetup

GiB = 1024 ** 3

# generation -> (topology prefix, chip config, HBM bytes per chip, TensorCores per chip in
# the accelerator-type count); HBM from Cloud TPU's system architecture pages
GENERATIONS = {
    "v4": ("v4", "megacore", 32 * GiB, 2),
    "v5p": ("v5", "megacore", int(95.74 * GiB), 2),
    "v5e": ("v5e", "default", int(15.75 * GiB), 1),
    "v6e": ("v6e", "default", 32 * GiB, 1),
}
# chips -> physical shape (as Cloud TPU lays out slices of these sizes)
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}
REMAT_SWEEP = ("none", "save_qkv_context_mlp", "save_dots", "save_qkv_context", "save_qkv",
               "full")


@dataclasses.dataclass(frozen=True)
class Target:
    """A Cloud TPU accelerator type as compile-only devices."""

    name: str  # e.g. v5p-8
    topology: str  # e.g. v5:2x2x1
    chip_config: str
    chips_per_host: tuple[int, int, int]
    hbm: int  # bytes per chip
    num_slices: int = 1

    @classmethod
    def parse(cls, name: str, num_slices: int = 1) -> "Target":
        gen, _, count = name.partition("-")
        if gen not in GENERATIONS or not count.isdigit():
            raise UsageError(f"unknown accelerator type {name!r}: e.g. v4-8, v5p-8, v5p-64, "
                             "v5e-16, v6e-8")
        prefix, chip_config, hbm, cores = GENERATIONS[gen]
        chips = int(count) // cores
        shapes = SHAPES_2D if gen in ("v5e", "v6e") else SHAPES_3D
        if chips not in shapes or int(count) % cores:
            sizes = ", ".join(f"{gen}-{c * cores}" for c in shapes)
            raise UsageError(f"{name}: no {gen} slice of that size; sizes: {sizes}")
        shape = shapes[chips]
        host = (min(2, shape[0]), min(2, shape[1]), 1)  # chips per host (4 per TPU VM)
        return cls(name, f"{prefix}:" + "x".join(map(str, shape)), chip_config, host, hbm,
                   num_slices)

    def devices(self):
        # compile-only: no TPU is opened, so several processes may load libtpu at once
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

        return topologies.get_topology_desc(
            platform="tpu", topology_name=self.topology, chip_config_name=self.chip_config,
            chips_per_host_bounds=self.chips_per_host, num_slices=self.num_slices).devices


@dataclasses.dataclass
class Report:
    """Per-device memory of a compiled step (bytes) and what it took to compile."""

    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments
    temporaries: int
    code: int
    compile_s: float
    hbm: int | None
    refused: str = ""  # the compiler's out-of-memory message (it stops before the rest)
    grad_accum: int = 0  # the micro-batches compiled (auto made concrete)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @property
    def fits(self) -> bool | None:
        if self.refused:
            return False
        return None if self.hbm is None else self.total <= self.hbm

    @classmethod
    def out_of_memory(cls, message: str, compile_s: float, hbm: int | None) -> "Report":
        """TPU's compiler stops with RESOURCE_EXHAUSTED when the temporaries alone exceed
        HBM; its message names them ('HLO temporaries (118.47G)')."""
        m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
        temps = int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024) if m else 0
        line = next((x for x in message.splitlines() if "RESOURCE_EXHAUSTED" in x),
                    message.splitlines()[0])
        return cls(0, 0, 0, temps, 0, compile_s, hbm, refused=line.strip())

    @classmethod
    def of(cls, compiled, compile_s: float, hbm: int | None) -> "Report":
        m = compiled.memory_analysis()
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                   m.temp_size_in_bytes, m.generated_code_size_in_bytes, compile_s, hbm)

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
        if self.refused:
            return [f"  temporaries  {g(self.temporaries)}  (more than HBM alone)",
                    f"  HBM          {g(self.hbm or 0)}  -> does NOT fit",
                    f"  compiler: {self.refused}"]
        out = [f"  arguments    {g(self.arguments)}  (parameters, optimizer state, batch)",
               f"  outputs      {g(self.outputs)}  ({g(self.aliased).strip()} of them "
               "written into the donated state)",
               f"  temporaries  {g(self.temporaries)}  (activations, gradients, workspace)",
               f"  code         {g(self.code)}",
               f"  total        {g(self.total)}"]
        if self.hbm is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"  HBM          {g(self.hbm)}  -> {verdict} "
                       f"({self.total / self.hbm:.0%} of HBM)")
        return out


def model_config(tc: TrainConfig, say):
    """The LlavaConfig a config trains: its preset, the one its weights describe, or
    llava15_7b for `auto` without weights."""
    if tc.model != "auto":
        return tc.llava.with_aspect(presets.get(tc.model))
    if tc.init.stage1_checkpoint or tc.init.hf_llava or (tc.init.hf_vision and tc.init.hf_llm):
        return model_spec.resolve(tc).cfg
    say("model: auto with no weights given (init.*): compiling the llava15_7b preset")
    return tc.llava.with_aspect(presets.get("llava15_7b"))


def compile_step(tc, cfg, devices, hbm, dump_hlo: str | None = None):
    """Lowers and compiles `tc`'s train step for `devices`: (Report, StepSetup)."""
    mesh = make_mesh(tc.mesh, devices=devices, dcn_sizes=tc.mesh_dcn, granule=tc.mesh_granule)
    tc = tc.for_mesh(mesh)
    check_batch_fits_mesh(tc, mesh)
    dcfg = tc.data_config(1)
    setup = StepSetup.of(tc, cfg, mesh, max(tc.total_steps, 1))
    batch = batch_format.abstract(tc.batch_size, dcfg.row_len, image_slots(dcfg, cfg),
                                  cfg.vision.image_size,
                                  "float32" if dcfg.normalize_on_host else "uint8",
                                  cfg.batch_views, cfg.taps)
    batch = with_shardings(batch, setup.batch_sh)
    t = time.time()
    with mesh_rules(mesh, tc.logical_axis_rules):
        lowered = setup.jit_step().lower(setup.abstract_state(), batch)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled = None
            report = Report.out_of_memory(str(e), time.time() - t, hbm)
    if compiled is not None:
        report = Report.of(compiled, time.time() - t, hbm)
    report.grad_accum = tc.grad_accum
    if dump_hlo and compiled is not None:
        Path(dump_hlo).mkdir(parents=True, exist_ok=True)
        (Path(dump_hlo) / "train_step.stablehlo.txt").write_text(lowered.as_text())
        (Path(dump_hlo) / "train_step.compiled.txt").write_text(compiled.as_text())
    return report, setup


@dataclasses.dataclass
class FixedPart:
    """What the step holds whatever the batch: the train state (parameters, optimizer
    state) and the gradient buffers and weight copies, per trainable parameter."""

    trainable: int  # parameters
    frozen: int
    state_bytes: int  # the train state on one device
    buffers_bytes: int  # temporaries with (almost) no activations, on one device
    devices: int

    def per_param(self, nbytes: int) -> float:
        """Bytes per trainable parameter (per parameter when most are frozen: stage 1)."""
        count = self.trainable if self.trainable >= self.frozen else self.trainable + \
            self.frozen
        return nbytes * self.devices / max(count, 1)

    def lines(self, report: Report) -> list[str]:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        fixed = self.state_bytes + self.buffers_bytes
        per = "trainable parameter" if self.trainable >= self.frozen else "parameter"
        return [
            f"  fixed part   {g(fixed)}: {self.per_param(fixed):.1f} B per {per} "
            f"({self.trainable:,} trainable, {self.frozen:,} frozen)",
            f"    state      {g(self.state_bytes)}: {self.per_param(self.state_bytes):.1f} "
            "B/param (parameters and optimizer state: 4 + Adam's 8 per trainable parameter, "
            "4 per frozen one, in float32)",
            f"    buffers    {g(self.buffers_bytes)}: {self.per_param(self.buffers_bytes):.1f} "
            "B/param (gradients and their accumulator, weight copies, workspace: the step "
            "compiled with one row per device per micro-batch)",
            f"  activations  {g(max(report.temporaries - self.buffers_bytes, 0))} (the rest of "
            "the temporaries)"]


def fixed_part(tc, cfg, devices, hbm, setup) -> FixedPart:
    """The step compiled again at one row per batch shard per micro-batch, each row as short
    as its images allow: its arguments are the train state (and a tiny batch), its
    temporaries the gradient buffers and weight copies."""
    mesh = make_mesh(tc.mesh, devices=devices, dcn_sizes=tc.mesh_dcn, granule=tc.mesh_granule)
    tc = tc.for_mesh(mesh)
    ways = batch_ways(mesh, tc.logical_axis_rules)
    images = image_slots(tc.data_config(1), cfg)
    length = -(-(cfg.view_tokens * cfg.max_views * images + 64) // 128) * 128
    small = dataclasses.replace(
        tc, batch_size=ways * tc.grad_accum,
        data=dataclasses.replace(tc.data, max_length=length, seq_len=0))
    report, _ = compile_step(small, cfg, devices, hbm)
    trainable, frozen = split(nn.unbox(setup.abstract_params),
                              setup.trainer.labels(setup.abstract_params))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa
    dcfg = small.data_config(1)
    batch = batch_format.abstract(small.batch_size, dcfg.row_len, images, cfg.vision.image_size,
                                  "float32" if dcfg.normalize_on_host else "uint8",
                                  cfg.batch_views, cfg.taps)
    batch_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in batch.values())
    return FixedPart(count(trainable), count(frozen),
                     report.arguments - batch_bytes // ways, report.temporaries, len(devices))


def _describe(tc, setup, mesh_devices: int, kind: str, grad_accum: int) -> str:
    rt = setup.rt
    auto = " (auto)" if not tc.grad_accum else ""
    return (f"{tc.batch_size} rows x {tc.data.seq_len or tc.data.max_length} tokens, "
            f"grad_accum {grad_accum}{auto}, packing {tc.data.packing}; {rt.dtype}, attention "
            f"{rt.attention_impl}, remat {rt.remat_policy}, scan {rt.scan_layers}, loss chunk "
            f"{rt.loss_chunk}; mesh {dict(tc.mesh)} on {mesh_devices} x {kind}")


def sweep(tc, cfg, devices, hbm, say, remats=REMAT_SWEEP, accums=None) -> list[tuple]:
    """Compiles every remat policy at increasing grad_accum (from the config's) until one
    fits: rows of
    (policy, grad_accum, Report or the error)."""
    accums = accums or [a for a in (1, 2, 4, 8, 16)
                        if a >= tc.grad_accum and tc.batch_size % a == 0]
    rows = []
    for policy in remats:
        for a in accums:
            c = dataclasses.replace(tc, grad_accum=a, runtime=dataclasses.replace(
                tc.runtime, remat_policy=policy))
            try:
                report, _ = compile_step(c, cfg, devices, hbm)
            except (ConfigError, ValueError) as e:
                rows.append((policy, a, str(e).splitlines()[0][:80]))
                continue
            rows.append((policy, a, report))
            size = (f">{report.temporaries / GiB:.0f}" if report.refused else
                    f"{report.total / GiB:.2f}")
            say(f"  {policy:22s} grad_accum {a:2d}: {size:>7s} GiB "
                f"({report.temporaries / GiB:.2f} temporaries) "
                f"{'fits' if report.fits else 'no'}  [{report.compile_s:.0f} s]")
            if report.fits:
                break
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmjax.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/stage2.py[:VARIANT]")
    parser.add_argument("--topology", default="",
                        help="Cloud TPU accelerator type (v5p-8, v5e-16, ...); default: the "
                             "local devices")
    parser.add_argument("--num-slices", type=int, default=1)
    parser.add_argument("--sweep", action="store_true",
                        help="compile remat policies x grad_accum and print what fits")
    parser.add_argument("--remat", default="", help="--sweep: comma-separated policies")
    parser.add_argument("--dump-hlo", default="", help="write the lowered and compiled HLO")
    parser.add_argument("--no-fixed", action="store_true", help="skip the second compile "
                        "that measures the fixed part (state, gradient buffers) apart from "
                        "activations")
    args, overrides = parser.parse_known_args(argv)
    say = lambda m: print(m, flush=True)  # noqa: E731
    try:
        tc = from_file(args.config, overrides)
        if args.topology:
            target = Target.parse(args.topology, args.num_slices)
            devices, hbm, kind = target.devices(), target.hbm, args.topology
            where = (f"{args.topology} ({target.topology}, {len(devices)} devices"
                     + (f", {args.num_slices} slices" if args.num_slices > 1 else "") + ")")
        else:
            devices, hbm, kind = jax.devices(), _local_hbm(), jax.devices()[0].device_kind
            where = f"{len(devices)} local {kind} devices"
        cfg = model_config(tc, say)
        say(f"model: {tc.model} ({type(cfg).__name__}: LLM {cfg.llm.num_layers} x "
            f"{cfg.llm.hidden_size}, vision {cfg.vision.num_layers} x "
            f"{cfg.vision.hidden_size}); stage {tc.stage}; target {where}")
        if args.sweep:
            remats = tuple(args.remat.split(",")) if args.remat else REMAT_SWEEP
            say("sweep: remat policy x grad_accum (the first grad_accum that fits per policy)")
            rows = sweep(tc, cfg, devices, hbm, say, remats)
            say("")
            say("| remat | grad_accum | total GiB | temporaries GiB | fits | compile s |")
            say("| --- | --- | --- | --- | --- | --- |")
            for policy, a, r in rows:
                if isinstance(r, Report):
                    total = f"> {r.temporaries / GiB:.0f}" if r.refused else \
                        f"{r.total / GiB:.2f}"
                    say(f"| {policy} | {a} | {total} | {r.temporaries / GiB:.2f} | "
                        f"{'yes' if r.fits else 'no'} | {r.compile_s:.0f} |")
                else:
                    say(f"| {policy} | {a} | - | - | error: {r} | - |")
            return 0 if any(isinstance(r, Report) and r.fits for *_, r in rows) else 1
        report, setup = compile_step(tc, cfg, devices, hbm, args.dump_hlo or None)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    say(_describe(tc, setup, len(devices), kind, report.grad_accum))
    say(f"compiled in {report.compile_s:.1f} s; per device:")
    for line in report.lines():
        say(line)
    if not report.refused and not args.no_fixed:
        try:
            fixed = fixed_part(tc, cfg, devices, hbm, setup)
        except (ConfigError, ValueError, jax.errors.JaxRuntimeError) as e:
            say(f"  fixed part: not measured ({str(e).splitlines()[0][:120]})")
        else:
            for line in fixed.lines(report):
                say(line)
    return 0 if report.fits in (True, None) else 1


def _local_hbm() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


if __name__ == "__main__":
    sys.exit(main())
