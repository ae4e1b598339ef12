"""The training entry point end to end on the demo config: a short stage 1, then a LoRA stage 2
from its checkpoint read back for generation; a recipe without weights or data fails at
start. (SIGKILL and resume to the same losses and samples: test_reliability.py.)"""
import json
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
    import jax
    import numpy as np

    # stage 2 with LoRA from stage 1 (the plain stage 2 from HF towers: test_recipe.py);
    # generation reads the run back: the model that the trainer's own (unmerged) parameters
    # compute, merged
    c3 = configlib.load(f"{ROOT}/configs/stage2.py:demo", _overrides(
        demo_data, 2, 1, [f"--config.init.stage1_checkpoint={tmp_path / 's1'}",
                          "--config.lora.enabled=True"]))
    h3 = train_lib.train(c3, tmp_path / "s3")
    # the frozen vision tower is exactly stage 1's
    for a, b in zip(jax.tree.leaves(jax.device_get(h1["state"].params["vision_tower"])),
                    jax.tree.leaves(jax.device_get(h3["state"].params["vision_tower"]))):
        np.testing.assert_array_equal(a, b)
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
