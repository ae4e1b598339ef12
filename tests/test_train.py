"""The training entry point end to end on the demo config: a short stage 1, then stage 2 from
its checkpoint; a run killed with SIGKILL resumes to the same per-step losses and samples;
a recipe without weights or data fails at start."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmjax import configlib
from mmjax import train as train_lib
from mmjax.data.synthetic import vocabulary_text, write_split
from mmjax.data.templates import VICUNA_SYSTEM
from mmjax.data.tokenizer_training import train_bpe_tokenizer
from mmjax.models import presets
from mmjax.models.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("demo")
    write_split(data, "train", 96, 56, seed=1)
    train_bpe_tokenizer(vocabulary_text() + [VICUNA_SYSTEM] * 3,
                        presets.get("demo").llm.vocab_size, data / "tokenizer")
    return data


def _overrides(data, stage, steps, extra=()):
    split = "captions" if stage == 1 else "instruct"
    sources = [{"kind": "llava_json", "path": str(data / f"train_{split}.json"),
                "image_root": str(data), "weight": 1.0}]
    return [f"--config.total_steps={steps}", f"--config.tokenizer={data / 'tokenizer'}",
            f"--config.data.sources={sources!r}", "--config.log_every=1",
            "--config.checkpoint.save_interval=2", *extra]


def test_stage1_then_stage2_from_its_checkpoint(demo_data, tmp_path):
    c1 = configlib.load(f"{ROOT}/configs/stage1.py:demo", _overrides(demo_data, 1, 4))
    h1 = train_lib.train(c1, tmp_path / "s1")
    assert len(h1["loss"]) == 4 and h1["loss"][-1][1] < h1["loss"][0][1]
    assert (tmp_path / "s1" / "config.json").exists()
    assert (tmp_path / "s1" / "checkpoints" / "4").exists()
    records = [json.loads(x) for x in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "tokens_per_s", "data_wait_s"} <= set(records[0])
    c2 = configlib.load(f"{ROOT}/configs/stage2.py:demo", _overrides(
        demo_data, 2, 2, [f"--config.init.stage1_checkpoint={tmp_path / 's1'}"]))
    state1 = h1["state"]
    h2 = train_lib.train(c2, tmp_path / "s2")
    import jax
    import numpy as np
    # the frozen vision tower is exactly stage 1's; the projector started from it
    for a, b in zip(jax.tree.leaves(jax.device_get(state1.params["vision_tower"])),
                    jax.tree.leaves(jax.device_get(h2["state"].params["vision_tower"]))):
        np.testing.assert_array_equal(a, b)

    # generation reads the run back: a LoRA run gives the model that the trainer's own
    # (unmerged) parameters compute, merged
    c3 = configlib.load(f"{ROOT}/configs/stage2.py:demo", _overrides(
        demo_data, 2, 1, [f"--config.init.stage1_checkpoint={tmp_path / 's1'}",
                          "--config.lora.enabled=True"]))
    h3 = train_lib.train(c3, tmp_path / "s3")
    from mmjax.inference import Engine, Request, Sampling
    from mmjax.inference.load import from_checkpoint
    from mmjax.models import Llava

    m = from_checkpoint(str(tmp_path / "s3"))
    assert m.template == "vicuna_v1" and m.model_id == "s3"
    tc3 = configlib.train_config(c3)
    assert tc3.model_runtime.lora_rank
    ids = np.arange(3, 40, dtype=np.int32)
    ids = ids[ids != m.cfg.image_token_id][None]
    trained = Llava(m.cfg, tc3.model_runtime).apply({"params": h3["state"].params}, ids)
    loaded = m.model.apply({"params": m.params}, ids)
    np.testing.assert_allclose(loaded, trained, atol=2e-5, rtol=1e-4)
    reply = Engine(m.model, m.params, m.tokenizer, mesh=m.mesh, rules=m.rules).generate(
        [Request(ids[0])], Sampling(max_new_tokens=3))[0]
    assert len(reply.token_ids) <= 3 and reply.finish in ("stop", "length")


def test_recipe_without_weights_or_data_fails_at_start():
    c = configlib.train_config(configlib.load(f"{ROOT}/configs/stage2.py:llava15_7b"))
    with pytest.raises(ConfigError, match="(?s)init.hf_llava.*data.sources.*stage1_checkpoint"
                                          ".*make demo"):
        train_lib.validate(c)


def _run(workdir, data, steps, wait_for_checkpoint=False):
    cmd = [sys.executable, "-m", "mmjax.train", "--config", f"{ROOT}/configs/stage1.py:demo",
           "--workdir", str(workdir), *_overrides(data, 1, steps,
                                                  ["--config.log_sample_ids=True"])]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    if not wait_for_checkpoint:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    ckpts = workdir / "checkpoints"
    while time.time() < deadline:
        done = [p for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
        if any(int(p.name) >= 4 for p in done):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


def _per_step(workdir):
    last = {}
    for line in (workdir / "samples.jsonl").read_text().splitlines():
        rec = json.loads(line)
        last[rec["step"]] = (rec["loss"], rec["ids"])  # a resumed run rewrites later steps
    return last


def test_sigkill_and_restart_gives_the_same_losses_and_samples(demo_data, tmp_path):
    full = _run(tmp_path / "full", demo_data, 10)
    assert full.returncode == 0, full.stderr[-2000:]
    _run(tmp_path / "killed", demo_data, 10, wait_for_checkpoint=True)
    killed_steps = _per_step(tmp_path / "killed")
    assert max(killed_steps) < 10  # really interrupted
    resumed = _run(tmp_path / "killed", demo_data, 10)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert _per_step(tmp_path / "killed") == _per_step(tmp_path / "full")  # bitwise on CPU
