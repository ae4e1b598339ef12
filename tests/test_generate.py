"""Generation: the KV-cache engine against transformers' `generate`, cached logits against the
full forward, sampling, stop conditions, and the generate / chat / predict commands."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from jitted import forward, init

from data_fixtures import bpe_tokenizer, write_photos
from hf_fixtures import llava_config, make_model, normalize, real_images, save
from mmjax.hf import load
from mmjax.inference import Engine, Request, Sampling
from mmjax.inference.load import inference_mesh
from mmjax.inference.prompt import request
from mmjax.models.kv_cache import KVCache
from mmjax.sharding import LOGICAL_AXIS_RULES

NEW = 32
PAIRS = [("clip", "llama"), ("siglip", "qwen2"), ("clip", "mistral")]


class IdTokenizer:
    """Ids as text: the engine's detokenizing is not under test here."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def encode(self, text, add_special_tokens=False):
        return [int(t) for t in text.split()]


def _hf_llava(vision, text, path):
    hf_cfg = llava_config(vision, text)
    if vision == "siglip":
        hf_cfg.vision_feature_layer, hf_cfg.vision_feature_select_strategy = -1, "full"
    if text == "mistral":
        hf_cfg.text_config.sliding_window = 8  # shorter than every prompt below
    model = make_model(tf.LlavaForConditionalGeneration, hf_cfg)
    save(model, path)
    return model


@pytest.fixture(scope="module", params=PAIRS, ids=["-".join(p) for p in PAIRS])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("-".join(request.param))
    hf = _hf_llava(*request.param, path)
    return hf, load(path)


def _requests(cfg, images, seed=0):
    """Rows of different lengths: one image, two images, no image."""
    rng = np.random.default_rng(seed)

    def ids(a, n_images, b):
        mid = []
        for _ in range(n_images):
            mid += [cfg.image_token_id] * cfg.image_tokens + list(rng.integers(3, 120, 2))
        return np.asarray([1, *rng.integers(3, 120, a), *mid, *rng.integers(3, 120, b)],
                          np.int32)

    return [Request(ids(3, 1, 5), [images[0]]), Request(ids(7, 2, 2), [images[1], images[2]]),
            Request(ids(11, 0, 4), [])]


def _images(cfg):
    v = cfg.vision
    return normalize(real_images(v.image_size, 3), v.image_mean, v.image_std)


def _hf_generate(model, requests, new=NEW):
    length = max(len(r.ids) for r in requests)
    ids = torch.zeros(len(requests), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(requests):
        ids[i, length - len(r.ids):] = torch.tensor(r.ids)
        mask[i, length - len(r.ids):] = 1
    pixels = torch.tensor(np.stack([im for r in requests for im in r.images])).permute(0, 3, 1, 2)
    model.generation_config.eos_token_id = None  # all NEW tokens on both sides
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                             max_new_tokens=new, do_sample=False)
    return out[:, length:].numpy()


def test_greedy_generation_matches_transformers(pair):
    hf, imported = pair
    requests = _requests(imported.config, _images(imported.config))
    ours = Engine(imported.model, imported.params, IdTokenizer()).generate(
        requests, Sampling(max_new_tokens=NEW))
    ref = _hf_generate(hf, requests)
    for r, row in zip(ours, ref):
        assert r.token_ids == row.tolist()
        assert r.finish == "length"


def test_cached_logits_equal_full_forward(pair):
    """At every decode step the logits from the cache equal the full forward's logits over
    the same (left-padded) prefix."""
    _check_cached_logits(pair[1], jnp.float32, tol=1e-5)


def test_bfloat16_cached_logits_follow_the_full_forward(clip_llama):
    from mmjax.models.config import RuntimeConfig

    bf16 = load(clip_llama.directory, RuntimeConfig(dtype="bfloat16", param_dtype="bfloat16"))
    _check_cached_logits(bf16, jnp.bfloat16, tol=3e-2)


def test_bfloat16_cache_under_a_float32_model(clip_llama):
    """A bfloat16 KV cache (half of what each decode step reads of it) under float32
    weights: the logits follow the full forward within bfloat16's rounding of keys and
    values, and greedy generation gives the float32 cache's tokens on these prompts."""
    _check_cached_logits(clip_llama, jnp.float32, tol=2e-2, cache_dtype=jnp.bfloat16)
    requests = _requests(clip_llama.config, _images(clip_llama.config))
    runs = {d: Engine(clip_llama.model, clip_llama.params, IdTokenizer(), cache_dtype=d)
            .generate(requests, Sampling(max_new_tokens=NEW)) for d in ("float32", "bfloat16")}
    same = [a.token_ids == b.token_ids for a, b in zip(runs["float32"], runs["bfloat16"])]
    assert sum(same) >= len(same) - 1, same


def _check_cached_logits(imported, dtype, tol, cache_dtype=None):
    model, params, cfg = imported.model, imported.params, imported.config
    requests = _requests(cfg, _images(cfg), seed=1)
    length = max(len(r.ids) for r in requests) + 2
    rows = len(requests)
    ids = np.zeros((rows, length), np.int32)
    seg = np.zeros((rows, length), np.int32)
    pixels = np.zeros((rows, 2) + _images(cfg).shape[1:], np.float32)
    for i, r in enumerate(requests):
        ids[i, length - len(r.ids):], seg[i, length - len(r.ids):] = r.ids, 1
        for m, im in enumerate(r.images):
            pixels[i, m] = im
    steps = 12
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0)
    cache = KVCache.empty(cfg.llm, rows, length + steps, cache_dtype or dtype)
    apply = jax.jit(model.apply, static_argnames=("prefill", "last_only"))
    out = apply({"params": params}, ids, pixels, pos, seg, cache=cache, prefill=True,
                last_only=True)
    logits, cache = out.logits, out.cache
    # the full forward over the prefix so far, in one shape: the prompt, the tokens decoded so
    # far, then padding on the right (segment 0: causal attention never reads it)
    full_ids = np.concatenate([ids, np.zeros((rows, steps), np.int32)], 1)
    full_seg = np.concatenate([seg, np.zeros((rows, steps), np.int32)], 1)
    for step in range(steps):
        full = apply({"params": params}, full_ids, pixels,
                     np.maximum(np.cumsum(full_seg, 1) - 1, 0), full_seg).logits
        full = full[:, length + step - 1]
        scale = 1.0 if dtype == jnp.float32 and cache_dtype is None else float(
            np.max(np.abs(full)))
        np.testing.assert_allclose(logits[:, 0], full, atol=tol * scale, rtol=tol)
        token = np.asarray(jnp.argmax(logits[:, 0], -1), np.int32)
        next_pos = pos[:, -1:] + 1 + step
        out = apply({"params": params}, token[:, None], None, next_pos,
                    np.ones_like(next_pos), cache=cache)
        logits, cache = out.logits, out.cache
        full_ids[:, length + step], full_seg[:, length + step] = token, 1


def test_tensor_parallel_decode_matches_one_device(tmp_path):
    hf = _hf_llava("clip", "llama", tmp_path)
    del hf
    one = load(tmp_path)
    mesh = inference_mesh(one.config)
    assert dict(mesh.shape)["tensor"] == 2 and dict(mesh.shape)["data"] == 4
    rules = LOGICAL_AXIS_RULES
    split = load(tmp_path, mesh=mesh, rules=rules)
    layer = split.params["language_model"]["layers"]["layers_0"]
    assert "tensor" in str(layer["self_attn"]["k_proj"]["kernel"].sharding.spec)
    requests = _requests(one.config, _images(one.config))
    sampling = Sampling(max_new_tokens=16)
    a = Engine(one.model, one.params, IdTokenizer()).generate(requests, sampling)
    b = Engine(split.model, split.params, IdTokenizer(), mesh=mesh, rules=rules).generate(
        requests, sampling)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


@pytest.fixture(scope="module")
def clip_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip-llama")
    _hf_llava("clip", "llama", path)
    return load(path)


def test_sampling_seeded_top_k_one_and_logprobs(clip_llama):
    m = clip_llama
    engine = Engine(m.model, m.params, IdTokenizer())
    requests = _requests(m.config, _images(m.config))
    hot = Sampling(max_new_tokens=16, temperature=1.5, top_p=0.95, logprobs=True)
    a = engine.generate(requests, hot, seed=3)
    b = engine.generate(requests, hot, seed=3)
    c = engine.generate(requests, hot, seed=4)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    greedy = engine.generate(requests, Sampling(max_new_tokens=16, logprobs=True))
    top1 = engine.generate(requests, Sampling(max_new_tokens=16, temperature=0.7, top_k=1),
                           seed=5)
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]
    # greedy log-probs are the model's: the argmax token's log-softmax, all <= 0
    assert all(len(r.logprobs) == 16 and max(r.logprobs) <= 0 for r in greedy)


def test_stop_tokens_and_stop_strings(clip_llama):
    m = clip_llama
    engine_free = Engine(m.model, m.params, IdTokenizer())
    requests = _requests(m.config, _images(m.config))
    free = engine_free.generate(requests, Sampling(max_new_tokens=16))
    row = free[0].token_ids
    # a stop token: the reply ends before its first occurrence, for that row only
    stop_id = row[5]
    engine = Engine(m.model, m.params, IdTokenizer(), stop_ids=[stop_id])
    stopped = engine.generate(requests, Sampling(max_new_tokens=16))
    assert stopped[0].token_ids == row[:row.index(stop_id)]
    assert stopped[0].finish == "stop"
    for s, f in zip(stopped[1:], free[1:]):
        cut = f.token_ids.index(stop_id) if stop_id in f.token_ids else len(f.token_ids)
        assert s.token_ids == f.token_ids[:cut]
    # a stop string of two tokens: cut where it begins, in the loop and in the text
    stop = f"{row[6]} {row[7]}"
    cut = engine_free.generate(requests, Sampling(max_new_tokens=16, stop=(stop,)))[0]
    text = " ".join(map(str, row))
    assert cut.text == text[:text.find(stop)] and cut.finish == "stop"
    assert cut.token_ids == row[:6]


# --------------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A llava-hf style directory: tiny random CLIP + Llama with a real (trained) tokenizer
    that has <image>, and photos to ask about."""
    root = tmp_path_factory.mktemp("llava-hf")
    corpus = ["a photo of a cat on the table", "USER: what is in the image? ASSISTANT: a cat",
              "Describe the image in detail.", "A chat between a curious user and an "
              "artificial intelligence assistant."] * 20
    tok = bpe_tokenizer(root, corpus, vocab_size=300)
    cfg = llava_config("clip", "llama", image_token_id=tok.convert_tokens_to_ids("<image>"))
    cfg.text_config.vocab_size = len(tok)
    cfg.text_config.eos_token_id = tok.eos_token_id
    model = make_model(tf.LlavaForConditionalGeneration, cfg)
    save(model, root)
    photos = write_photos(root / "images")
    return root, tok, model, photos


def _run(module, *args, stdin=None, timeout=300):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.e2e
def test_generate_command_raw_matches_transformers(hf_dir):
    root, tok, model, photos = hf_dir
    prompt = "USER: <image>\nwhat is in the image? ASSISTANT:"
    r = _run("mmjax.generate", "--hf", root, "--image", root / "images" / photos[1],
             "--prompt", prompt, "--template", "raw", "--max-new-tokens", 12,
             "--output", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # the same ids and pixels through transformers
    from mmjax.data.image import decode_image, preprocess
    from mmjax.hf.config import from_hf
    cfg = from_hf(json.loads((root / "config.json").read_text()), root)
    v = cfg.vision
    px = preprocess(decode_image((root / "images" / photos[1]).read_bytes()), v.image_size,
                    v.image_mean, v.image_std)
    head, tail = prompt.split("<image>")
    ids = (tok.encode(head) + [cfg.image_token_id] * cfg.image_tokens
           + tok.encode(tail, add_special_tokens=False))
    model.generation_config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor([ids]),
                             pixel_values=torch.tensor(px[None]).permute(0, 3, 1, 2),
                             max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    if tok.eos_token_id in ref:
        ref = ref[:ref.index(tok.eos_token_id)]
    assert out["token_ids"] == ref
    assert out["text"] == tok.decode(ref, skip_special_tokens=True).strip()


@pytest.mark.e2e
def test_generate_command_mistakes_are_one_line(hf_dir, tmp_path):
    root, _, _, photos = hf_dir
    r = _run("mmjax.generate", "--hf", root, "--image", tmp_path / "nope.png", "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: image {tmp_path / 'nope.png'} does not exist"]
    r = _run("mmjax.generate", "--checkpoint", tmp_path, "--prompt", "hi")
    assert r.returncode == 2 and "not a training work dir" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.e2e
def test_chat_piped_two_turns_and_image_change(hf_dir):
    root, _, _, photos = hf_dir
    lines = ["What is in the image?", "Describe the image in detail.",
             f"/image {root / 'images' / photos[2]}", "What is in the image?", "/exit",
             "never read"]
    r = _run("mmjax.chat", "--hf", root, "--image", root / "images" / photos[0],
             "--max-new-tokens", 8, stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    replies = [line for line in out if line.startswith("ASSISTANT: ")]
    assert len(replies) == 3
    assert any(line.startswith("(image ") for line in out)

    # the same conversation in-process on the same two devices: the streamed lines are the
    # replies, and the second turn's prompt holds the first turn
    import io

    from mmjax.chat import Chat
    from mmjax.inference.load import from_hf
    m = from_hf(root, devices=jax.devices()[:2])
    buf = io.StringIO()
    chat = Chat(m, m.engine(), Sampling(max_new_tokens=8), buf)
    chat.set_image(root / "images" / photos[0])
    first = chat.say(lines[0])
    second = chat.say(lines[1])
    assert [f"ASSISTANT: {g}" for g in (first, second)] == replies[:2]
    assert buf.getvalue().splitlines() == [first, second]
    assert chat.pairs == [(lines[0], first), (lines[1], second)]
    two_turns = request(m, chat.pairs + [("next", "")], chat.images).ids
    assert len(two_turns) > len(request(m, [("next", "")], chat.images).ids)


@pytest.mark.e2e
def test_predict_resumes_after_kill_answering_each_question_once(hf_dir, tmp_path):
    root, _, _, photos = hf_dir
    questions = tmp_path / "q.jsonl"
    with open(questions, "w") as f:
        for i in range(24):
            q = {"question_id": i, "text": "What is in the image?", "category": "x"}
            if i % 5:
                q["image"] = photos[i % len(photos)]
            f.write(json.dumps(q) + "\n")
    out = tmp_path / "answers.jsonl"
    args = ["--hf", root, "--questions", questions, "--image-root", root / "images", "--out",
            out, "--batch-size", 4, "--max-new-tokens", 6]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.Popen([sys.executable, "-m", "mmjax.predict", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or
                                      len(out.read_text().splitlines()) < 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = out.read_text().splitlines()
    assert 8 <= len(first) < 24, "the kill came too late to test resuming"
    r = _run("mmjax.predict", *args)
    assert r.returncode == 0, r.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(a["question_id"] for a in answers) == list(range(24))
    assert set(answers[0]) == {"question_id", "prompt", "text", "answer_id", "model_id",
                               "metadata"}
    assert answers[0]["prompt"] == "What is in the image?" and answers[0]["model_id"] == root.name


def test_unstacked_scanned_parameters_run_unscanned():
    """Checkpoints trained with scan_layers decode with per-layer parameters."""
    import dataclasses

    import flax.linen as nn

    from mmjax.models import Llava, presets
    from mmjax.models.config import RuntimeConfig
    from mmjax.models.llm import unstack_layers

    cfg = presets.get("demo")
    scanned_rt = RuntimeConfig(scan_layers=True)
    scanned = Llava(cfg, scanned_rt)
    s = cfg.vision.image_size
    ids = jnp.arange(3, 30, dtype=jnp.int32)[None]
    params = nn.unbox(init(scanned, jax.random.key(0), ids, jnp.zeros((1, 1, s, s, 3))))["params"]
    plain = Llava(cfg, dataclasses.replace(scanned_rt, scan_layers=False))
    np.testing.assert_allclose(forward(plain, {"params": unstack_layers(params)}, ids).logits,
                               forward(scanned, {"params": params}, ids).logits, atol=1e-5,
                               rtol=1e-5)
