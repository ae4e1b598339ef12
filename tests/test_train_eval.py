"""Evaluation during training (eval.every_steps): validation loss on held-out records and a
benchmark on the live parameters, in metrics.jsonl and TensorBoard."""
import json
from pathlib import Path

import pytest
from jitted import forward
from runs import overrides as _overrides
from runs import train as run_train

from mmjax import configlib
from mmjax.data.synthetic import write_split
from mmjax.training.config import from_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
def test_evaluation_during_training(demo_data, tmp_path):
    """eval.every_steps: validation loss on held-out records that never train (the same
    batches each time, equal to the loss computed here from the final parameters) and a
    benchmark on the live (scanned, LoRA) parameters, in metrics.jsonl and TensorBoard with
    example predictions."""
    import jax
    from test_train_ops import _tensorboard_scalars

    from mmjax.data.pipeline import build_pipeline, holdout_indices
    from mmjax.training.step import token_loss

    heldout = write_split(demo_data, "evalq", 6, 56, seed=3)
    bench = [{"name": "short_answer", "data": str(heldout["qa"]), "limit": 5}]
    c1 = configlib.load(f"{ROOT}/configs/stage1.py:demo", _overrides(
        demo_data, 1, 2, ["--config.runtime.scan_layers=True"]))
    run_train(c1, tmp_path / "s1")
    c = configlib.load(f"{ROOT}/configs/stage2.py:demo", _overrides(demo_data, 2, 4, [
        f"--config.init.stage1_checkpoint={tmp_path / 's1'}", "--config.lora.enabled=True",
        "--config.runtime.scan_layers=True", "--config.data.holdout_share=0.25",
        "--config.eval.every_steps=3", "--config.eval.heldout_batches=2",
        f"--config.eval.benchmarks={bench!r}", "--config.eval.examples=2",
        "--config.log_sample_ids=True"]))
    work = tmp_path / "s2"
    h = run_train(c, work)
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in evals] == [3, 4]  # every 3 steps and after the last
    assert {"val/perplexity", "eval/short_answer/accuracy", "eval/short_answer/skipped",
            "eval/seconds"} <= set(evals[0])
    examples = [r for r in records if "eval/short_answer" in r]
    assert len(examples) == 2 and len(examples[0]["eval/short_answer"]) == 2
    assert set(examples[0]["eval/short_answer"][0]) == {"question", "answer", "reference"}
    report = json.loads((work / "eval" / "step_4" / "short_answer" / "results.json")
                        .read_text())
    assert report["answer_lines"] == 5 and report["model"]["id"] == "s2:4"
    tags = _tensorboard_scalars(work / "tensorboard")
    assert [s for s, _ in tags["val/loss"]] == [3, 4]
    # the held-out records never train
    tc = from_config(c)
    dcfg = tc.data_config(1)
    n = len(json.loads((demo_data / "train_instruct.json").read_text()))
    train_idx, held_idx = holdout_indices(n, 0.25)
    records_all = json.loads((demo_data / "train_instruct.json").read_text())
    held_ids = {records_all[i]["id"] for i in held_idx}
    seen = {i for line in (work / "samples.jsonl").read_text().splitlines()
            for row in json.loads(line)["ids"] for i in row}
    assert seen and not seen & held_ids
    # val/loss at the last step: the mean token loss of the first two held-out batches
    import dataclasses

    from mmjax import batch as batch_format
    from mmjax.models import Llava
    from mmjax.training.model_spec import read

    recipe = read(work)
    data = build_pipeline(dataclasses.replace(dcfg, shuffle=False, num_epochs=1,
                                              template=recipe.template),
                          recipe.tokenizer, recipe.cfg, part="heldout")
    model = Llava(recipe.cfg, tc.model_runtime)
    params = jax.device_get(h["state"].params)
    total = count = 0
    for _ in range(2):
        b = next(data)
        pixels = batch_format.device_pixels(b["pixel_values"], recipe.cfg.vision)
        logits = forward(model, {"params": params}, b["input_ids"], pixels, b["positions"],
                             b["segment_ids"]).logits
        t, k = token_loss(logits, b["targets"])
        total, count = total + float(t), count + int(k)
    assert evals[-1]["val/loss"] == pytest.approx(total / count, rel=1e-4)

