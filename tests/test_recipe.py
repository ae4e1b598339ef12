"""LLaVA's recipe from separate Hugging Face towers (tiny random ones, made with transformers):
stage 1 with model='auto' adds <image> (and pad) to a plain LLM tokenizer, grows the
vocabulary, starts from the towers bitwise, saves the model and tokenizer in its work dir;
stage 2 reads them back from there with no model, tokenizer or weight flags, in the LLM
family's template; runs load for generation and export to transformers at parity (four
tower pairs, from work dirs built without training); one pair trains end to end (the
projector only in stage 1, the LLM in stage 2, a resume). A preset that differs from the
towers fails at start naming the fields."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers as tf
from jitted import forward
from runs import env as _env
from runs import train as run_train
from tiny_runs import make_run

from data_fixtures import CHAT_SPECIALS, conv, llama_sp_tokenizer, write_photos
from hf_fixtures import llm_config, make_model, safetensors_of, save, vision_config
from mmjax import configlib
from mmjax.errors import ConfigError
from mmjax.export import export
from mmjax.hf import load as hf_load
from mmjax.inference.load import from_checkpoint
from mmjax.models.llm import unstack_layers
from mmjax.training import model_spec
from mmjax.training.checkpoint import restore_subtree
from mmjax.training.config import TrainConfig, from_config

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ["A photo of an astronaut in a white suit.", "A brown cat lies on a blanket.",
          "A cup of coffee on a saucer.", "A rocket on its launch pad.",
          "What is in the picture? Describe it briefly. Answer in one word."] * 4
# (vision, LLM family, tokenizer kind, expected stage-2 template)
PAIRS = {"clip-llama": ("clip", "llama", "sentencepiece", "vicuna_v1"),
         # Llama-2 / Vicuna's slow tokenizer: a "▁" after every special token
         "clip-llama-legacy": ("clip", "llama", "sentencepiece-legacy", "vicuna_v1"),
         "siglip-qwen2": ("siglip", "qwen2", "chatml", "chatml"),
         "clip-mistral": ("clip", "mistral", "sentencepiece", "mistral_instruct"),
         "clip-llama3": ("clip", "llama3", "llama3", "llama_3")}
ARCH = {"llama": tf.LlamaForCausalLM, "llama3": tf.LlamaForCausalLM,
        "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM}


def _tokenizer(kind: str, out: Path):
    if kind.startswith("sentencepiece"):  # Llama-2 / Vicuna / Mistral: no <image>, no pad
        llama_sp_tokenizer(out, CORPUS, legacy=kind.endswith("legacy"), vocab_size=300)
        return tf.AutoTokenizer.from_pretrained(str(out))  # as saved: no chat specials
    from mmjax.data.tokenizer_training import train_bpe_tokenizer

    # byte-level BPE with Qwen2's or Llama-3's chat tokens (and no <image>)
    specials = CHAT_SPECIALS[:2] if kind == "chatml" else CHAT_SPECIALS[2:]
    return train_bpe_tokenizer(CORPUS, 300, out, extra_special_tokens=tuple(specials))


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """Per pair: HF vision dir, HF LLM dir (its tokenizer beside the weights), data dir."""
    root = tmp_path_factory.mktemp("towers")
    data = root / "data"
    photos = write_photos(data, size=(80, 60))
    captions = [{"id": f"cap{i}", "image": p,
                 "conversations": conv("<image>", CORPUS[i % 4])}
                for i, p in enumerate(photos * 4)]
    chats = [{"id": f"chat{i}", "image": p,
              "conversations": conv("What is in the picture?\n<image>", CORPUS[i % 4],
                                    "Describe it briefly.", CORPUS[(i + 1) % 4])}
             for i, p in enumerate(photos * 4)]
    (data / "captions.json").write_text(json.dumps(captions))
    (data / "chats.json").write_text(json.dumps(chats))
    out = {}
    for name, (vision, family, kind, _) in PAIRS.items():
        d = root / name
        save(make_model(tf.CLIPVisionModel if vision == "clip" else tf.SiglipVisionModel,
                        vision_config(vision)), d / "vision")
        tok = _tokenizer(kind, d / "llm")
        save(make_model(ARCH[family], llm_config(family, vocab_size=len(tok))), d / "llm")
        out[name] = (d / "vision", d / "llm", len(tok))
    return out, data


def _overrides(data: Path, split: str, steps: int, extra=()):
    sources = [{"kind": "llava_json", "path": str(data / f"{split}.json"),
                "image_root": str(data), "weight": 1.0}]
    return [f"--config.data.sources={sources!r}", f"--config.total_steps={steps}",
            "--config.batch_size=8", "--config.data.workers=0", "--config.data.max_length=256",
            "--config.log_every=1", "--config.checkpoint.save_interval=1",
            "--config.runtime.dtype=float32", *extra]


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _assert_equal(a, b, keys=None):
    fa, fb = _flat(a), _flat(b)
    for k in keys or fb:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _params(workdir, part, cfg_tree, step=None):
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            cfg_tree)
    return restore_subtree(workdir / "checkpoints", ("params", part), abstract, step)


def _hf_flags(out, name):
    vision_dir, llm_dir, _ = out[name]
    flags = [f"--config.init.hf_vision={vision_dir}", f"--config.init.hf_llm={llm_dir}"]
    if PAIRS[name][0] == "siglip":  # from the last layer; no CLS, so 'auto' keeps every patch
        flags += ["--config.llava.vision_feature_layer=-1"]
    return flags


def _stage_config(data, stage: int, steps: int, extra) -> TrainConfig:
    split = "captions" if stage == 1 else "chats"
    return from_config(configlib.load(f"{ROOT}/configs/stage{stage}.py",
                                      _overrides(data, split, steps, extra)))


def _check_stage1_model(spec, family, base_vocab):
    """What stage 1 resolves from two towers: <image> (and pad) added after the vocabulary,
    which grows to a multiple of 64; the `plain` template; the family and its tying."""
    tok = spec.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert spec.cfg.image_token_id == image_id >= base_vocab  # added after the vocabulary
    assert spec.cfg.llm.vocab_size % 64 == 0 and spec.cfg.llm.vocab_size >= len(tok) > base_vocab
    assert "<image>" in spec.added_tokens and tok.pad_token is not None
    assert spec.template == "plain" and spec.base_vocab == base_vocab
    assert spec.cfg.llm.family == ("llama" if family == "llama3" else family)
    assert spec.cfg.llm.tie_word_embeddings == (family == "qwen2")
    # transformers' "default" drops the first token of any tower: CLIP's CLS; SigLIP has
    # none, so its patches are all kept ("full")
    assert spec.cfg.vision_feature_select == ("default" if spec.cfg.vision.has_cls else "full")
    assert spec.cfg.image_tokens == spec.cfg.vision.num_patches


def _check_towers_are_the_hf_weights(params, vision_dir, llm_dir, base_vocab, family):
    """The recipe scans its layers (stacked 'layer/...'); per layer they are the HF weights,
    bitwise (the LLM's first base_vocab rows; the new rows are drawn near their mean)."""
    flat_state = unstack_layers(params)
    lm = _flat(flat_state["language_model"])
    for k, v in _flat(hf_load(llm_dir).params).items():
        if "embed_tokens" in k or "lm_head" in k:
            axis = 0 if "embed_tokens" in k else 1
            np.testing.assert_array_equal(np.take(lm[k], range(base_vocab), axis), v, k)
            new = np.take(lm[k], range(base_vocab, lm[k].shape[axis]), axis)
            assert np.all(np.isfinite(new)) and np.abs(new.mean(axis) - v.mean(axis)).max() < 0.1
        else:
            np.testing.assert_array_equal(lm[k], v, k)
    if family == "qwen2":
        assert not any("lm_head" in k for k in lm)  # still tied: one table
    hf_vision = _flat(hf_load(vision_dir).params)
    mine = _flat(flat_state["vision_tower"])
    assert len(mine) < len(hf_vision)  # built up to the layer LLaVA reads
    for k, v in mine.items():
        np.testing.assert_array_equal(v, hf_vision[k], k)
    return flat_state


# the fast tier composes LLaVA-1.5's pair; the other families run with the end-to-end tests
@pytest.mark.parametrize("name", [n if n == "clip-llama" else pytest.param(
    n, marks=pytest.mark.e2e) for n in PAIRS])
def test_towers_compose_save_load_and_export_per_family(towers, name, tmp_path):
    """Per tower pair, without training (the step is the same for every family: the
    end-to-end test below trains one pair): stage 1 resolves the model from the towers and
    initialises from their weights bitwise; stage 2 resolves it back from the stage-1 work
    dir alone in the family's template; the run loads for generation and exports to a
    transformers LLaVA that gives its logits, greedy tokens and prompt."""
    out, data = towers
    vision_dir, llm_dir, base_vocab = out[name]
    vision, family, _, template = PAIRS[name]
    hf = _hf_flags(out, name)
    tc1 = _stage_config(data, 1, 1, hf)
    w1 = make_run(tmp_path / "w1", tc1)
    r1 = model_spec.read(w1)
    _check_stage1_model(r1, family, base_vocab)
    fresh = model_spec.resolve(tc1)  # the model and tokenizer read back equal those resolved
    assert fresh.cfg == r1.cfg and fresh.tokenizer.get_vocab() == r1.tokenizer.get_vocab()
    params = from_checkpoint(str(w1), dtype="float32").params
    flat_state = _check_towers_are_the_hf_weights(params, vision_dir, llm_dir, base_vocab,
                                                  family)
    if not r1.cfg.llm.tie_word_embeddings:
        _image_row_is_never_read(r1.cfg, flat_state)
    hf1 = export(str(w1), tmp_path / "hf1", dtype="float32", say=lambda _: None)
    _towers_round_trip(hf1, vision_dir, llm_dir, base_vocab)

    tc2 = _stage_config(data, 2, 1, [f"--config.init.stage1_checkpoint={w1}"])
    w2 = make_run(tmp_path / "w2", tc2, perturb=0.0)
    r2 = model_spec.read(w2)
    assert r2.cfg == r1.cfg and r2.tokenizer.get_vocab() == r1.tokenizer.get_vocab()
    assert r2.template == template
    m = from_checkpoint(str(w2), dtype="float32")
    assert m.cfg == r1.cfg and m.template == template
    _assert_equal(m.params["vision_tower"], params["vision_tower"])
    _assert_equal(m.params["projector"], params["projector"])
    hf2 = export(str(w2), tmp_path / "hf2", dtype="float32", say=lambda _: None)
    _same_in_transformers(hf2, m)


@pytest.mark.e2e
def test_stage1_from_towers_then_stage2_from_its_work_dir(towers, tmp_path, capsys):
    """The recipe trained for real on one pair (CLIP + Llama, sentencepiece): stage 1 trains
    the projector only (both towers stay the HF weights), stage 2 from the work dir alone
    trains the LLM, a resume runs the third step only, and the run generates and exports."""
    name = "clip-llama"
    out, data = towers
    vision_dir, llm_dir, base_vocab = out[name]
    vision, family, _, template = PAIRS[name]
    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    hf = _hf_flags(out, name)
    h1 = run_train(configlib.load(f"{ROOT}/configs/stage1.py",
                                  _overrides(data, "captions", 2, hf)), w1)
    assert "model " in capsys.readouterr().out
    r1 = model_spec.read(w1)
    _check_stage1_model(r1, family, base_vocab)
    state = h1["state"].params
    _check_towers_are_the_hf_weights(state, vision_dir, llm_dir, base_vocab, family)
    projector_1 = _params(w1, "projector", state["projector"], step=1)
    assert any(np.any(a != b) for a, b in zip(
        jax.tree.leaves(jax.device_get(projector_1)),
        jax.tree.leaves(jax.device_get(state["projector"]))))  # the projector trains
    assert all(np.isfinite(loss) for _, loss in h1["loss"])

    # stage 2 from the work dir alone: model, tokenizer, towers and projector from stage 1
    s2 = _overrides(data, "chats", 2, [f"--config.init.stage1_checkpoint={w1}"])
    h2 = run_train(configlib.load(f"{ROOT}/configs/stage2.py", s2), w2)
    r2 = model_spec.read(w2)
    assert r2.cfg == r1.cfg and r2.template == template
    _assert_equal(h2["state"].params["vision_tower"], state["vision_tower"])
    # the LLM starts from stage 1's (step 1 runs at warm-up lr 0) and then trains
    _assert_equal(_params(w2, "language_model", state["language_model"], step=1),
                  state["language_model"])
    assert any(np.any(a != b) for a, b in zip(
        jax.tree.leaves(jax.device_get(h2["state"].params["language_model"])),
        jax.tree.leaves(jax.device_get(state["language_model"]))))
    # resume: the third step only
    capsys.readouterr()
    h2 = run_train(configlib.load(f"{ROOT}/configs/stage2.py", _overrides(
        data, "chats", 3, [f"--config.init.stage1_checkpoint={w1}"])), w2)
    assert "resumed from" in capsys.readouterr().out and [s for s, _ in h2["loss"]] == [3]
    # loaded for use (generate / predict / evaluate --checkpoint): params only, same model
    m = from_checkpoint(f"{w2}:3", dtype="float32")
    assert m.cfg == r1.cfg and m.template == template
    _assert_equal(m.params["projector"], h2["state"].params["projector"])
    hf2 = export(f"{w2}:3", tmp_path / "hf2", dtype="float32", say=lambda _: None)
    _same_in_transformers(hf2, m)


def _towers_round_trip(exported, vision_dir, llm_dir, base_vocab):
    """Every tensor of the HF towers is in the export bitwise (the LLM's first base_vocab
    rows), under transformers' LLaVA names."""
    mine = safetensors_of(exported)
    for k, v in safetensors_of(vision_dir).items():
        np.testing.assert_array_equal(mine["vision_tower." + k.removeprefix("vision_model.")],
                                      v, k)
    for k, v in safetensors_of(llm_dir).items():
        ours = mine["language_model." + k]
        np.testing.assert_array_equal(ours[:base_vocab] if ours.shape != v.shape else ours, v, k)


def _same_in_transformers(exported, m):
    """transformers alone, on the exported directory: its logits and greedy tokens on
    mmjax's ids equal mmjax's; `mmjax.hf verify` passes; and its own processor and chat
    template turn a one-image prompt and a two-turn one (a real, non-square photo) into the
    ids and pixels the run trained on, with logits within 1e-5."""
    import torch
    from PIL import Image
    from skimage import data
    from test_generate import _hf_generate

    from hf_fixtures import rel_err
    from mmjax.batch import normalize
    from mmjax.hf.verify import verify
    from mmjax.inference import Engine, Request, Sampling

    hf = tf.LlavaForConditionalGeneration.from_pretrained(exported).eval()
    cfg = m.cfg
    photo = Image.fromarray(data.chelsea()).resize((80, 60))
    image = normalize(m.pixels(photo), cfg.vision.image_mean, cfg.vision.image_std)
    ids = np.asarray([1, *([cfg.image_token_id] * cfg.image_tokens), 5, 6, 7, 8], np.int32)
    ours = forward(m.model, {"params": m.params}, ids[None], image[None, None]).logits
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids[None], dtype=torch.long),
                 pixel_values=torch.tensor(image[None]).permute(0, 3, 1, 2)).logits.numpy()
    assert rel_err(ours, ref) < 1e-5
    requests = [Request(ids, [image])]
    mine = Engine(m.model, m.params, m.tokenizer).generate(requests, Sampling(max_new_tokens=8))
    assert mine[0].token_ids == _hf_generate(hf, requests, 8)[0].tolist()
    err, tol = verify(str(exported), "float32", None, 2, 16, 0)
    assert err < tol
    if m.template == "plain":
        return
    proc = tf.AutoProcessor.from_pretrained(exported)
    encoder = m.encoder()
    one = ([{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "What is this?"}]}],
           [("<image>\nWhat is this?", "")])
    two = (one[0] + [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                     {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]}],
           [("<image>\nWhat is this?", "A cat."), ("And the colour?", "")])
    for messages, pairs in (one, two):
        text = proc.apply_chat_template(messages, add_generation_prompt=True)
        batch = proc(images=photo, text=text, return_tensors="np")
        prompt = encoder.prompt_ids(None, pairs)
        assert batch["input_ids"][0].tolist() == prompt.tolist(), text
        np.testing.assert_allclose(batch["pixel_values"][0].transpose(1, 2, 0), image,
                                   rtol=0, atol=1e-6)
        ours = forward(m.model, {"params": m.params}, prompt[None], image[None, None]).logits
        with torch.no_grad():
            ref = hf(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
        assert rel_err(ours, ref) < 1e-5


def _image_row_is_never_read(cfg, params):
    """The image token's embedding row only marks where image features go: NaN in it changes
    no logit."""
    import jax.numpy as jnp

    from mmjax.models import Llava
    from mmjax.models.config import RuntimeConfig

    model = Llava(cfg, RuntimeConfig())
    ids = jnp.asarray([[1, *([cfg.image_token_id] * cfg.image_tokens), 5, 6, 7]])
    images = jax.random.normal(jax.random.key(1), (1, 1, cfg.vision.image_size,
                                                    cfg.vision.image_size, 3))
    ref = forward(model, {"params": params}, ids, images).logits
    lm = dict(params["language_model"])
    lm["embed_tokens"] = lm["embed_tokens"].at[cfg.image_token_id].set(jnp.nan)
    out = forward(model, {"params": {**params, "language_model": lm}}, ids, images).logits
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_a_preset_that_differs_from_the_towers_fails_at_start(towers, tmp_path):
    out, data = towers
    vision_dir, llm_dir, _ = out["clip-llama"]
    hf = [f"--config.init.hf_vision={vision_dir}", f"--config.init.hf_llm={llm_dir}"]
    c = configlib.load(f"{ROOT}/configs/stage1.py:llava_1b", _overrides(data, "captions", 1, hf))
    with pytest.raises(ConfigError, match=r"preset 'llava_1b' differs from the HF configs") as e:
        run_train(c, tmp_path / "preset")
    assert "vision.image_size: 336 vs 56" in str(e.value) and "llm.vocab_size: 32064 vs " in str(
        e.value)
    assert not (tmp_path / "preset" / "model.json").exists()  # nothing resolved or saved


@pytest.mark.e2e
def test_readme_commands_through_the_cli(towers, tmp_path):
    """The README's two commands (stage 1 from two towers, stage 2 from its work dir)."""
    out, data = towers
    vision_dir, llm_dir, _ = out["clip-llama"]
    w1, w2 = tmp_path / "W1", tmp_path / "W2"
    base = [sys.executable, "-m", "mmjax.train", "--config"]
    r = subprocess.run(base + [f"{ROOT}/configs/stage1.py", "--workdir", str(w1),
                               f"--config.init.hf_vision={vision_dir}",
                               f"--config.init.hf_llm={llm_dir}",
                               *_overrides(data, "captions", 1)],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(base + [f"{ROOT}/configs/stage2.py", "--workdir", str(w2),
                               f"--config.init.stage1_checkpoint={w1}",
                               *_overrides(data, "chats", 1)],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "template vicuna_v1" in r.stdout and (w2 / "tokenizer" / "tokenizer.json").exists()


def test_a_hf_llava_round_trips_bitwise(towers, tmp_path):
    """A whole LlavaForConditionalGeneration directory: imported by a stage-2 run (its
    initial state, as the first step at warm-up lr 0 leaves it), exported: every tensor
    bitwise the original's, and transformers gives the original's logits."""
    import torch

    from hf_fixtures import llava_config, normalize, real_images, rel_err

    _, data = towers
    src = tmp_path / "llava"
    tok = llama_sp_tokenizer(src, CORPUS, legacy=False, vocab_size=300)
    tok = tf.AutoTokenizer.from_pretrained(str(src))
    model_spec.add_tokens(tok)
    tok.save_pretrained(str(src))
    hf_cfg = llava_config("clip", "llama", image_token_id=tok.convert_tokens_to_ids("<image>"))
    hf_cfg.text_config.vocab_size = 320
    original = make_model(tf.LlavaForConditionalGeneration, hf_cfg)
    save(original, src)
    make_run(tmp_path / "run", _stage_config(data, 2, 1, [f"--config.init.hf_llava={src}"]))
    out = export(str(tmp_path / "run"), tmp_path / "hf", dtype="float32", say=lambda _: None)
    mine, theirs = safetensors_of(out), safetensors_of(src)
    assert set(theirs) <= set(mine)
    for k, v in theirs.items():
        np.testing.assert_array_equal(mine[k], v, k)
    back = tf.LlavaForConditionalGeneration.from_pretrained(out).eval()
    v = hf_cfg.vision_config
    image = normalize(real_images(v.image_size, 1), (0.48145466, 0.4578275, 0.40821073),
                      (0.26862954, 0.26130258, 0.27577711))
    n = (v.image_size // v.patch_size) ** 2
    ids = torch.tensor([[1, *([hf_cfg.image_token_id] * n), 5, 6, 7]])
    pixels = torch.tensor(image).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert rel_err(back(input_ids=ids, pixel_values=pixels).logits.numpy(),
                       original(input_ids=ids, pixel_values=pixels).logits.numpy()) < 1e-5
