"""Evaluation during training: validation loss on held-out training data and benchmarks.

Every `eval.every_steps` steps (and after the last one) the loop calls the `Evaluator`:

  (a) `val/loss` (and `val/perplexity`): the mean next-token loss over the first
      `eval.heldout_batches` batches of the held-out records (`data.holdout_share` of the
      mixture, a fixed set that never trains), the same batches at every evaluation;
  (b) each of `eval.benchmarks` ({name, data, split, variant, image_root, limit}, as
      `python -m mmjax.evaluate` takes them) on its first `limit` questions, greedy, through
      the KV-cache engine on the live parameters (LoRA merged, layers unstacked): its metrics
      as `eval/NAME/METRIC`, its report and answers in WORKDIR/eval/step_N/NAME/, and a few
      example predictions (image, question, answer, reference) as TensorBoard text and images.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from mmjax import batch as batch_format
from mmjax.evaluation import benchmarks as bench_lib
from mmjax.models.config import ConfigError


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark to run during training (the arguments of `python -m mmjax.evaluate`)."""

    name: str  # vqav2, gqa, textvqa, pope, scienceqa, mme, mmbench, chartqa, vizwiz, short_answer
    data: str  # the benchmark's folder as released (MMBench: the TSV; short_answer: the file)
    split: str = ""  # default: the one LLaVA-1.5 reports
    variant: str = ""
    image_root: str = ""
    limit: int = 0  # questions asked; 0: eval.limit
    blank_images: bool = False  # the blind baseline: every image the tower's mean colour
    tag: str = ""  # the metrics' prefix eval/TAG/ (default: the name)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training (off unless every_steps is set)."""

    every_steps: int = 0  # evaluate every N steps and after the last; 0 = never
    heldout_batches: int = 8  # batches of data.holdout_share records for val/loss; 0 = all
    benchmarks: tuple[BenchmarkSpec, ...] = ()  # [{name, data, limit, tag, ...}]: BenchmarkSpec
    limit: int = 200  # questions per benchmark unless its own limit says otherwise
    batch_size: int = 32  # generation rows
    max_new_tokens: int = 0  # 0: each benchmark's own
    examples: int = 4  # example predictions per benchmark in TensorBoard / metrics.jsonl

    def due(self, done: int, total: int) -> bool:
        return bool(self.every_steps) and (done % self.every_steps == 0 or done == total)


class Evaluator:
    """Runs (a) and (b) above on the live parameters; returns scalars for the writer."""

    def __init__(self, cfg: EvalConfig, trainer, dcfg, tokenizer, template: str, mesh, rules,
                 param_shardings, workdir: Path, writer=None):
        from mmjax.data.pipeline import build_pipeline
        from mmjax.evaluate import limit_items

        self.cfg, self.trainer, self.tokenizer, self.template = cfg, trainer, tokenizer, template
        self.mesh, self.rules, self.workdir, self.writer = mesh, rules, Path(workdir), writer
        self.image_aspect = dcfg.image_aspect
        self.val_fn = None
        if dcfg.holdout_share:
            heldout = dataclasses.replace(dcfg, shuffle=False, num_epochs=1, workers=0)
            self._heldout = lambda: build_pipeline(heldout, tokenizer, trainer.model.cfg,
                                                   part="heldout")
            self.val_fn = trainer.jit_eval(param_shardings,
                                           batch_format.shardings(mesh, rules))
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
        while batches < limit:
            batch = next(data, None)
            if not _all_processes(batch is not None):
                break
            m = jax.device_get(self.val_fn(params, batch_format.global_batch(
                batch, self.mesh, self.rules)))
            total += float(m["loss_sum"])
            count += int(m["label_tokens"])
            batches += 1
        if not count:
            return {}
        loss = total / count
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0)),
                "val/label_tokens": count}

    # ------------------------------------------------------------------ (b)
    def benchmarks(self, params, step: int) -> dict:
        from mmjax.evaluate import pixels, run
        from mmjax.inference import cli

        m = live_model(self.trainer.model, params, self.tokenizer, self.template, self.mesh,
                       self.rules, self.image_aspect, f"{self.workdir.name}:{step}")
        engine = cli.engine(m)
        lead = jax.process_index() == 0
        out = {}
        for spec, bench, items, read_skips in self.benches:
            tag = spec.tag or spec.name
            where = self.workdir / "eval" / f"step_{step}" / tag if lead else None
            bench.skips = copy.deepcopy(read_skips)  # this evaluation's own skips on top
            report = run(m, bench, where, batch_size=self.cfg.batch_size,
                         max_new_tokens=self.cfg.max_new_tokens or None, engine=engine,
                         progress=False, items=items, blank_images=spec.blank_images)
            for k, v in report["metrics"].items():
                out[f"eval/{tag}/{k}"] = v
            out[f"eval/{tag}/skipped"] = report["skipped"]
            if self.writer is not None and self.cfg.examples:
                examples = [{"question": it.text, "answer": text,
                             "reference": bench.reference(it),
                             "image": pixels(m, it.image, spec.blank_images)
                             if it.image is not None else None}
                            for it, text in report["answers"][:self.cfg.examples]]
                self.writer.examples(step, f"eval/{tag}", examples)
        return out


def live_model(model, params, tokenizer, template: str, mesh, rules, image_aspect: str,
               model_id: str):
    """The training parameters as the engine runs them (`inference.load.Loaded`): LoRA merged
    into the kernels, scanned layers unstacked, on the training mesh."""
    from mmjax.inference.load import Loaded, default_attention
    from mmjax.models import Llava
    from mmjax.models.config import RuntimeConfig
    from mmjax.models.llm import unstack_layers
    from mmjax.training import lora

    rt = model.rt
    if rt.lora_rank:
        params = lora.merge(params, rt)
    if rt.scan_layers:
        params = unstack_layers(params)
    inference_rt = RuntimeConfig(dtype=rt.dtype, param_dtype=rt.param_dtype,
                                 attention_impl=default_attention(rt.dtype))
    return Loaded(Llava(model.cfg, inference_rt), params, tokenizer, template, model_id, mesh,
                  tuple(rules), image_aspect=image_aspect)


def _all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process (one tiny collective when there are several)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))
