"""The training entry point end to end on the demo config: a short stage 1, then a LoRA stage 2
from its checkpoint read back for generation; a recipe without weights or data fails at
start. (SIGKILL and resume to the same losses and samples: test_reliability.py.)"""
import json

import pytest
from runs import ROOT
from runs import overrides as _overrides
from runs import train as run_train

from mmjax import configlib
from mmjax.errors import ConfigError
from mmjax.training.config import from_config, validate


def test_stage1_then_stage2_from_its_checkpoint(demo_data, tmp_path):
    c1 = configlib.load(f"{ROOT}/configs/stage1.py:demo", _overrides(demo_data, 1, 4))
    h1 = run_train(c1, tmp_path / "s1")
    assert len(h1["loss"]) == 4 and h1["loss"][-1][1] < h1["loss"][0][1]
    assert (tmp_path / "s1" / "config.json").exists()
    assert (tmp_path / "s1" / "checkpoints" / "4").exists()
    records = [json.loads(x) for x in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "tokens_per_s", "data_wait_s"} <= set(records[0])
    import jax
    import numpy as np

    # stage 2 with LoRA from stage 1 (the plain stage 2 from HF towers: test_recipe.py);
    # generation reads the run back: the model that the trainer's own (unmerged) parameters
    # compute, merged
    c3 = configlib.load(f"{ROOT}/configs/stage2.py:demo", _overrides(
        demo_data, 2, 1, [f"--config.init.stage1_checkpoint={tmp_path / 's1'}",
                          "--config.lora.enabled=True"]))
    h3 = run_train(c3, tmp_path / "s3")
    # the frozen vision tower is exactly stage 1's
    for a, b in zip(jax.tree.leaves(jax.device_get(h1["state"].params["vision_tower"])),
                    jax.tree.leaves(jax.device_get(h3["state"].params["vision_tower"]))):
        np.testing.assert_array_equal(a, b)
    from mmjax.inference import Engine, Request, Sampling
    from mmjax.inference.load import from_checkpoint
    from mmjax.models import Llava

    m = from_checkpoint(str(tmp_path / "s3"))
    assert m.template == "vicuna_v1" and m.model_id == "s3"
    tc3 = from_config(c3)
    assert tc3.model_runtime.lora_rank
    ids = np.arange(3, 40, dtype=np.int32)
    ids = ids[ids != m.cfg.image_token_id][None]
    trained = Llava(m.cfg, tc3.model_runtime).apply({"params": h3["state"].params}, ids).logits
    loaded = m.model.apply({"params": m.params}, ids).logits
    np.testing.assert_allclose(loaded, trained, atol=2e-5, rtol=1e-4)
    reply = Engine(m.model, m.params, m.tokenizer, mesh=m.mesh, rules=m.rules).generate(
        [Request(ids[0])], Sampling(max_new_tokens=3))[0]
    assert len(reply.token_ids) <= 3 and reply.finish in ("stop", "length")
    _export_checks(tmp_path, m, trained, ids)


def _export_checks(tmp_path, m, trained, ids):
    """The LoRA run exported (merged) to a transformers LLaVA: the trainer's logits; the
    refusals; a crash leaves nothing that looks complete; --llm-only, --projector-only;
    `python -m mmjax.hf verify` passes on the export."""
    import subprocess
    import sys

    import numpy as np
    import torch
    import transformers as tf

    from mmjax import export as export_lib
    from mmjax.hf import writer
    from mmjax.hf.verify import verify

    run, out = tmp_path / "s3", tmp_path / "hf"
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
    r = subprocess.run([sys.executable, "-m", "mmjax.hf", "export", "--checkpoint", str(run),
                        "--out", str(out), "--dtype", "float32", "--merge-lora",
                        "--shard-size", "200KB"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors.index.json").exists()  # sharded as transformers does
    hf = tf.LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ref, trained, atol=2e-5, rtol=1e-4)
    err, tol = verify(str(out), "float32", None, 2, 16, 0)
    assert err < tol
    r = subprocess.run([sys.executable, "-m", "mmjax.hf", "export", "--checkpoint", str(run),
                        "--out", str(out), "--merge-lora"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "--overwrite" in r.stderr

    llm = export_lib.export(str(run), tmp_path / "llm", dtype="float32", merge_lora=True,
                            what="llm", say=lambda _: None)
    lm = tf.AutoModelForCausalLM.from_pretrained(llm).eval()
    text = ids[:, :8]
    with torch.no_grad():
        ref = lm(input_ids=torch.tensor(text, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ref, np.asarray(m.model.apply({"params": m.params}, text).logits),
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

