"""Evaluation during training: validation loss on held-out training data and benchmarks.

`mmjax.train` (and the demo) hand `evaluators` to `mmjax.training.run.train`, which calls it
with what the run built; every `eval.every_steps` steps (and after the last one) the loop
calls the `Evaluator` with the live parameters:

  (a) `val/loss` (and `val/perplexity`): the mean next-token loss over the first
      `eval.heldout_batches` batches of the held-out records (`data.holdout_share` of the
      mixture, a fixed set that never trains), the same batches at every evaluation;
  (b) each of `eval.benchmarks` ({name, data, split, variant, image_root, limit}, as
      `python -m mmjax.evaluate` takes them) on its first `limit` questions, greedy, through
      the KV-cache engine on the live parameters (LoRA merged and layers unstacked by one
      jitted function onto the training mesh; one engine per run, so its programs compile
      once): its metrics as `eval/NAME/METRIC`, its report and answers in
      WORKDIR/eval/step_N/NAME/, and a few example predictions (image, question, answer,
      reference) as TensorBoard text and images.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax import batch as batch_format
from mmjax.data.pipeline import build_pipeline
from mmjax.errors import ConfigError
from mmjax.evaluation import benchmarks as bench_lib
from mmjax.evaluation.runner import limit_items, run
from mmjax.inference.load import Loaded
from mmjax.models import Llava
from mmjax.models.runtime import for_inference
from mmjax.training.config import EvalConfig
from mmjax.training.run import RunContext
from mmjax.training.saved_run import inference_params_fn


def check(cfg: EvalConfig) -> None:
    """Names a wrong benchmark setting (split, variant, a missing folder) in one line before
    a run loads any weight; the files are read when the run's evaluator is built."""
    for i, spec in enumerate(cfg.benchmarks):
        try:
            bench_lib.get(spec.name, spec.data, spec.image_root or None, spec.split,
                          spec.variant)
        except bench_lib.BenchmarkError as e:
            raise ConfigError(f"eval.benchmarks[{i}]: {e}") from None
        if not Path(spec.data).exists():
            raise ConfigError(f"eval.benchmarks[{i}].data: {spec.data} does not exist")


def evaluators(ctx: RunContext) -> "Evaluator | None":
    """The run's evaluator (None when its config asks for nothing to evaluate)."""
    ev = Evaluator(ctx)
    return ev if ev.active else None


class Evaluator:
    """Runs (a) and (b) above on the live parameters; returns scalars for the writer."""

    def __init__(self, ctx: RunContext):
        cfg = ctx.tc.eval
        self.cfg, self.ctx = cfg, ctx
        self.workdir = Path(ctx.workdir)
        trainer = ctx.setup.trainer
        self.val_fn = None
        if ctx.data.holdout_share:
            heldout = dataclasses.replace(ctx.data, shuffle=False, num_epochs=1, workers=0)
            self._heldout = lambda: build_pipeline(heldout, ctx.spec.tokenizer, ctx.spec.cfg,
                                                   part="heldout")
            self.val_fn = trainer.jit_eval(ctx.setup.param_sh, ctx.setup.batch_sh)
        self.benches = []
        for spec in cfg.benchmarks:  # read once, at start: a wrong path fails before training
            try:
                bench = bench_lib.get(spec.name, spec.data, spec.image_root or None, spec.split,
                                      spec.variant)
                items = limit_items(bench.read(), spec.limit or cfg.limit)
            except bench_lib.BenchmarkError as e:
                raise ConfigError(f"eval.benchmarks: {e}") from None
            self.benches.append((spec, bench, items, copy.deepcopy(bench.skips)))
        tags = [spec.tag or spec.name for spec, *_ in self.benches]
        if len(set(tags)) != len(tags):
            raise ConfigError(f"eval.benchmarks: tags {tags} repeat; give each a tag")
        self._model = self._engine = self._convert = None

    @property
    def active(self) -> bool:
        return self.val_fn is not None or bool(self.benches)

    def __call__(self, params, step: int) -> dict:
        out = self.validation_loss(params) if self.val_fn is not None else {}
        if self.benches:
            out.update(self.benchmarks(params, step))
        return out

    # ------------------------------------------------------------------ (a)
    def validation_loss(self, params) -> dict:
        total, count, batches = 0.0, 0, 0
        data = self._heldout()
        limit = self.cfg.heldout_batches or math.inf
        mesh, rules = self.ctx.mesh, self.ctx.tc.logical_axis_rules
        while batches < limit:
            batch = next(data, None)
            if not _all_processes(batch is not None):
                break
            m = jax.device_get(self.val_fn(params, batch_format.global_batch(batch, mesh,
                                                                             rules)))
            total += float(m["loss_sum"])
            count += int(m["label_tokens"])
            batches += 1
        if not count:
            return {}
        loss = total / count
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0)),
                "val/label_tokens": count}

    # ------------------------------------------------------------------ (b)
    def live_model(self, params, step: int) -> Loaded:
        """The training parameters as the engine runs them, on the training mesh (the
        conversion and the engine's programs are built at the first evaluation only)."""
        ctx = self.ctx
        mesh, rules = ctx.mesh, ctx.tc.logical_axis_rules
        if self._model is None:
            trained = ctx.setup.rt
            rt = for_inference(mesh.devices.flat[0], trained.dtype, trained=trained)
            self._model = Llava(ctx.spec.cfg, rt)
            self._convert = inference_params_fn(ctx.spec.cfg, trained, rt, mesh, rules)
        m = Loaded(self._model, self._convert(params), ctx.spec.tokenizer, ctx.spec.template,
                   f"{self.workdir.name}:{step}", mesh, tuple(rules),
                   image_aspect=ctx.data.image_aspect)
        self._engine = m.engine() if self._engine is None else \
            self._engine.with_params(m.params)
        return m

    def benchmarks(self, params, step: int) -> dict:
        m = self.live_model(params, step)
        lead = jax.process_index() == 0
        out = {}
        for spec, bench, items, read_skips in self.benches:
            tag = spec.tag or spec.name
            where = self.workdir / "eval" / f"step_{step}" / tag if lead else None
            bench.skips = copy.deepcopy(read_skips)  # this evaluation's own skips on top
            report = run(m, bench, where, batch_size=self.cfg.batch_size,
                         max_new_tokens=self.cfg.max_new_tokens or None, engine=self._engine,
                         progress=False, items=items, blank_images=spec.blank_images)
            for k, v in report["metrics"].items():
                out[f"eval/{tag}/{k}"] = v
            out[f"eval/{tag}/skipped"] = report["skipped"]
            if self.cfg.examples:
                examples = [{"question": it.text, "answer": text,
                             "reference": bench.reference(it),
                             "image": m.pixels(it.image, spec.blank_images)
                             if it.image is not None else None}
                            for it, text in report["answers"][:self.cfg.examples]]
                self.ctx.writer.examples(step, f"eval/{tag}", examples)
        return out


def _all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process (one tiny collective when there are several)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))
