"""The training entry point end to end on the demo config: a short stage 1, then a LoRA stage 2
from its checkpoint, read back for generation and exported to transformers (one pair of runs
for the module, each property its own test); a recipe without weights or data fails at
start. (SIGKILL and resume to the same losses and samples: test_reliability.py.)"""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from jitted import forward
from runs import ROOT
from runs import overrides as _overrides
from runs import train as run_train

from mmjax import configlib
from mmjax import export as export_lib
from mmjax.errors import ConfigError
from mmjax.hf import writer
from mmjax.hf.verify import verify
from mmjax.inference import Engine, Request, Sampling
from mmjax.inference.load import from_checkpoint
from mmjax.models import Llava
from mmjax.training.config import from_config, validate


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    """Stage 1 (4 steps), then stage 2 with LoRA from its checkpoint (1 step)."""
    root = tmp_path_factory.mktemp("runs")
    c1 = configlib.load(f"{ROOT}/configs/stage1.py:demo", _overrides(demo_data, 1, 4))
    h1 = run_train(c1, root / "s1")
    c3 = configlib.load(f"{ROOT}/configs/stage2.py:demo", _overrides(
        demo_data, 2, 1, [f"--config.init.stage1_checkpoint={root / 's1'}",
                          "--config.lora.enabled=True"]))
    h3 = run_train(c3, root / "s3")
    ids = np.arange(3, 40, dtype=np.int32)
    return {"root": root, "h1": h1, "h3": h3, "tc3": from_config(c3), "ids": ids}


@pytest.fixture(scope="module")
def loaded(runs):
    """The LoRA run read back for generation, and the logits its trainer's own (unmerged)
    parameters compute on a text prompt."""
    m = from_checkpoint(str(runs["root"] / "s3"))
    ids = runs["ids"][runs["ids"] != m.cfg.image_token_id][None]
    trained = forward(Llava(m.cfg, runs["tc3"].model_runtime),
                      {"params": runs["h3"]["state"].params}, ids).logits
    return m, ids, np.asarray(trained)


@pytest.mark.e2e
def test_stage1_trains_checkpoints_and_logs(runs):
    h1, s1 = runs["h1"], runs["root"] / "s1"
    assert len(h1["loss"]) == 4 and h1["loss"][-1][1] < h1["loss"][0][1]
    assert (s1 / "config.json").exists() and (s1 / "checkpoints" / "4").exists()
    records = [json.loads(x) for x in (s1 / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "tokens_per_s", "data_wait_s"} <= set(records[0])


@pytest.mark.e2e
def test_lora_stage2_keeps_the_frozen_tower(runs):
    assert runs["tc3"].model_runtime.lora_rank
    for a, b in zip(jax.tree.leaves(jax.device_get(runs["h1"]["state"].params["vision_tower"])),
                    jax.tree.leaves(jax.device_get(runs["h3"]["state"].params["vision_tower"]))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.e2e
def test_a_lora_run_loads_for_generation_as_it_trained(loaded):
    """Generation reads the run back: the model that the trainer's own (unmerged) parameters
    compute, merged; the engine generates from it."""
    m, ids, trained = loaded
    assert m.template == "vicuna_v1" and m.model_id == "s3"
    np.testing.assert_allclose(forward(m.model, {"params": m.params}, ids).logits, trained,
                               atol=2e-5, rtol=1e-4)
    reply = Engine(m.model, m.params, m.tokenizer, mesh=m.mesh, rules=m.rules).generate(
        [Request(ids[0])], Sampling(max_new_tokens=3))[0]
    assert len(reply.token_ids) <= 3 and reply.finish in ("stop", "length")


@pytest.mark.e2e
def test_export_refuses_unmerged_lora_and_a_crash_leaves_nothing(runs, tmp_path):
    run, out = runs["root"] / "s3", tmp_path / "hf"
    with pytest.raises(ConfigError, match="--merge-lora"):
        export_lib.export(str(run), out, dtype="float32")
    real = writer.write_safetensors

    def crash(path, tensors):  # a crash (or a kill) in the middle of writing the weights
        raise KeyboardInterrupt

    writer.write_safetensors = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            export_lib.export(str(run), out, dtype="float32", merge_lora=True)
    finally:
        writer.write_safetensors = real
    assert not out.exists() and not list(tmp_path.glob(".hf.export-*"))


@pytest.mark.e2e
def test_export_command_sharded_runs_as_trained_in_transformers(runs, loaded, tmp_path):
    """`python -m mmjax.hf export --merge-lora` in shards: transformers gives the trainer's
    logits, `mmjax.hf verify` passes, and a second export into it is refused."""
    _, ids, trained = loaded
    run, out = runs["root"] / "s3", tmp_path / "hf"
    cmd = [sys.executable, "-m", "mmjax.hf", "export", "--checkpoint", str(run), "--out",
           str(out), "--merge-lora"]
    r = subprocess.run(cmd + ["--dtype", "float32", "--shard-size", "200KB"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors.index.json").exists()  # sharded as transformers does
    hf = tf.LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ref, trained, atol=2e-5, rtol=1e-4)
    err, tol = verify(str(out), "float32", None, 2, 16, 0)
    assert err < tol
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--overwrite" in r.stderr


@pytest.mark.e2e
def test_export_llm_only_and_projector_only(runs, loaded, tmp_path):
    m, ids, _ = loaded
    run = runs["root"] / "s3"
    llm = export_lib.export(str(run), tmp_path / "llm", dtype="float32", merge_lora=True,
                            what="llm", say=lambda _: None)
    lm = tf.AutoModelForCausalLM.from_pretrained(llm).eval()
    text = ids[:, :8]
    with torch.no_grad():
        ref = lm(input_ids=torch.tensor(text, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ref, forward(m.model, {"params": m.params}, text).logits,
                               atol=2e-5, rtol=1e-4)
    proj = export_lib.export(str(run), tmp_path / "proj", merge_lora=True, what="projector",
                             say=lambda _: None)
    weights = torch.load(proj / "mm_projector.bin", weights_only=True)
    assert sorted(weights) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                               "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    np.testing.assert_array_equal(weights["model.mm_projector.0.weight"].numpy(),
                                  np.asarray(m.params["projector"]["linear_1"]["kernel"]).T)


def test_recipe_without_weights_or_data_fails_at_start():
    c = from_config(configlib.load(f"{ROOT}/configs/stage2.py:llava15_7b"))
    with pytest.raises(ConfigError, match="(?s)init.hf_llava.*data.sources.*stage1_checkpoint"
                                          ".*make demo"):
        validate(c)
