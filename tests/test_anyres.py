"""LLaVA-NeXT's any-resolution layout (mmjax.models.anyres) against transformers' own code, run
as it is: the grid choice (`select_best_resolution`), the fitted size
(`get_patch_output_size`), the views' pixels (`LlavaNextImageProcessorPil`: base view first,
then the tiles row by row) and the token count per image (`LlavaNextProcessor.
_get_number_of_features`), on portrait, landscape, square, tiny and extreme images and on
sizes that tie between pinpoints."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import eval_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from runs import train
from skimage import data
from tiny_runs import make_run
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from data_fixtures import bpe_tokenizer
from hf_fixtures import (
    hf_loss_sum,
    llm_config,
    make_model,
    rel_err,
    safetensors_of,
    save,
    vision_config,
)
from mmjax import configlib, evaluate
from mmjax.data.pipeline import (
    DataConfig,
    SourceConfig,
    build_pipeline,
    check_aspect,
    make_encoder,
)
from mmjax.data.templates import normalize_turns
from mmjax.errors import ConfigError
from mmjax.export import export
from mmjax.hf import load, load_tokenizer
from mmjax.hf.verify import verify
from mmjax.inference import Engine, Request, Sampling
from mmjax.inference.load import from_checkpoint, from_hf
from mmjax.inference.prompt import request
from mmjax.models import anyres
from mmjax.training import model_spec
from mmjax.training.config import from_config
from mmjax.training.optimizer import OptimConfig
from mmjax.training.step import Trainer

NEXT = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-NeXT's list
ROOT = Path(__file__).resolve().parent.parent
ONEVISION = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]  # anyres_max_9
SMALL = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]  # NEXT at a 28-pixel tower

SIZES = [(480, 640), (640, 480), (500, 500), (1, 1), (3, 700), (700, 3), (50, 300), (300, 50),
         (336, 672), (672, 336), (1000, 1000), (2000, 300), (224, 224), (17, 999), (768, 1024),
         (1024, 768), (335, 671), (337, 673)]


def _random_sizes(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(int(x) for x in rng.integers(1, 3000, 2)) for _ in range(n)]


@pytest.mark.parametrize("pinpoints", [NEXT, ONEVISION, SMALL], ids=["next", "ov", "small"])
def test_the_grid_and_the_fitted_size_are_transformers(pinpoints):
    for h, w in SIZES + _random_sizes():
        got = anyres.best_resolution(h, w, pinpoints)
        assert got == tuple(select_best_resolution((h, w), pinpoints)), (h, w)
        image = np.zeros((3, h, w), np.uint8)
        assert anyres.fitted_size(h, w, *got) == get_patch_output_size(
            image, got, ChannelDimension.FIRST), (h, w)


def test_ties_keep_the_first_pinpoint():
    # a square image fits 336x672 and 672x336 alike: the first listed wins, in either order
    assert anyres.best_resolution(300, 300, [[336, 672], [672, 336]]) == (336, 672)
    assert anyres.best_resolution(300, 300, [[672, 336], [336, 672]]) == (672, 336)


@pytest.mark.parametrize("size", [(40, 90), (90, 40), (56, 56), (5, 5), (7, 200), (200, 7),
                                  (50, 300), (300, 50), (29, 57), (113, 31)])
def test_the_views_are_transformers_pixels(size):
    h, w = size
    rng = np.random.default_rng(h * 1000 + w)
    image = rng.integers(0, 256, (h, w, 3), np.uint8)
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 28},
                                      crop_size={"height": 28, "width": 28},
                                      image_grid_pinpoints=SMALL)
    want = proc(image, return_tensors="np")
    views, (rows, cols) = anyres.views(image, SMALL, 28)
    assert tuple(want["image_sizes"][0]) == (h, w)
    pixels = (views.astype(np.float32) / 255 - np.array(OPENAI_CLIP_MEAN)) / np.array(
        OPENAI_CLIP_STD)
    theirs = want["pixel_values"][0][:len(views)]  # [views, 3, T, T], padded to the most views
    assert theirs.shape[0] == 1 + rows * cols
    np.testing.assert_allclose(pixels.transpose(0, 3, 1, 2), theirs, atol=1e-5)


def _their_count(pinpoints, tile, patch, h, w, strategy="default"):
    """LlavaNextProcessor._get_number_of_features, run as it is on its attributes."""
    me = types.SimpleNamespace(image_processor=types.SimpleNamespace(
        image_grid_pinpoints=pinpoints), patch_size=patch, num_additional_image_tokens=1)
    me._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, me)
    n = LlavaNextProcessor._get_number_of_features(me, h, w, tile, tile)
    return n - 1 if strategy == "default" else n


@pytest.mark.parametrize("pinpoints,tile,patch", [(NEXT, 336, 14), (SMALL, 28, 14),
                                                  (ONEVISION, 384, 14)])
def test_token_counts_are_transformers(pinpoints, tile, patch):
    for h, w in SIZES + _random_sizes(200, seed=1):
        want = _their_count(pinpoints, tile, patch, h, w)
        assert anyres.feature_tokens(h, w, pinpoints, tile, patch) == want, (h, w)
        full = _their_count(pinpoints, tile, patch, h, w, "full")
        assert anyres.feature_tokens(h, w, pinpoints, tile, patch, cls=True) == full


def test_a_square_image_on_the_2x2_grid():
    """A 672x672 image takes NeXT's 2x2 pinpoint whole: the base view's 24 x 24 = 576
    features, the 48 x 48 grid (no padding to remove) and a newline per row: 2,928 tokens
    (2,880 features from five views, plus 48 newlines)."""
    assert anyres.feature_tokens(672, 672, NEXT, 336, 14) == 576 + 48 * 48 + 48 == 2928
    assert anyres.views(np.zeros((672, 672, 3), np.uint8), NEXT, 336)[1] == (2, 2)


@pytest.mark.parametrize("pinpoints,tile,patch", [(SMALL, 28, 14), (NEXT, 336, 14)])
def test_gathering_the_sources_is_transformers_pack_image_features(pinpoints, tile, patch):
    """The features the model gathers for an image (its views' features and the newline)
    are, row for row, what LlavaNextModel.pack_image_features makes of them."""
    n = tile // patch
    me = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(image_size=tile, patch_size=patch),
        image_grid_pinpoints=pinpoints))
    gen = torch.Generator().manual_seed(0)
    for h, w in SIZES[:12] + _random_sizes(20, seed=2):
        rows, cols = (s // tile for s in anyres.best_resolution(h, w, pinpoints))
        feats = torch.randn(1 + rows * cols, n * n, 8, generator=gen)
        newline = torch.randn(8, generator=gen)
        (want,), lens = LlavaNextModel.pack_image_features(
            me, [feats], torch.tensor([[h, w]]), "default", newline)
        table = torch.cat([feats.reshape(-1, 8), newline[None]])
        src = anyres.feature_sources(h, w, pinpoints, tile, patch)
        assert len(src) == int(lens[0]) == anyres.feature_tokens(h, w, pinpoints, tile, patch)
        assert torch.equal(table[torch.from_numpy(src).long()], want), (h, w)


def test_an_imported_llava_next_gives_transformers_logits(tmp_path):
    """A tiny random LlavaNextForConditionalGeneration (CLIP + Llama, pinpoints of a 56-pixel
    tower) saved by transformers and imported: one prompt with a portrait and a landscape
    image, each its own grid; mmjax's logits (views from mmjax.models.anyres, the features
    gathered by its sources) equal transformers' (its own processor's pixels and
    image_sizes) within 1e-5."""
    pins = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
    hf_cfg = tf.LlavaNextConfig(vision_config=vision_config("clip"),
                                text_config=llm_config("llama"), image_grid_pinpoints=pins,
                                image_token_index=127)
    model = make_model(tf.LlavaNextForConditionalGeneration, hf_cfg)
    save(model, tmp_path)
    imported = load(tmp_path)
    cfg = imported.config
    assert cfg.anyres and cfg.max_views == 5 and cfg.view_tokens == 16  # 1 + 2 x 2
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (90, 40, 3), np.uint8),
              rng.integers(0, 256, (40, 130, 3), np.uint8)]
    counts = [anyres.feature_tokens(*im.shape[:2], pins, 56, 14) for im in images]
    ids = [5, 6] + [127] * counts[0] + [7, 8, 9] + [127] * counts[1] + [10, 11]
    ids = np.asarray([ids])
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 56},
                                      crop_size={"height": 56, "width": 56},
                                      image_grid_pinpoints=pins)
    inputs = proc(images, return_tensors="pt")
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), pixel_values=inputs["pixel_values"],
                     image_sizes=inputs["image_sizes"]).logits.numpy()
    s, p = cfg.max_views, cfg.view_tokens
    pixels = np.zeros((1, 2, s, 56, 56, 3), np.float32)
    sources = np.zeros(ids.shape, np.int32)
    at = np.flatnonzero(ids[0] == 127)
    k = 0
    for m, im in enumerate(images):
        views, _ = anyres.views(im, pins, 56)
        pixels[0, m, :len(views)] = (views / 255 - np.array(OPENAI_CLIP_MEAN)) / np.array(
            OPENAI_CLIP_STD)
        src = anyres.row_sources(anyres.feature_sources(*im.shape[:2], pins, 56, 14),
                                 len(views), m, 2, s, p)  # into the row's table
        sources[0, at[k:k + len(src)]] = src
        k += len(src)
    assert k == len(at)
    got = jax.jit(lambda prm, i, px, src: imported.model.apply(
        {"params": prm}, i, px, image_sources=src).logits)(
        imported.params, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(sources))
    assert rel_err(got, want) < 1e-5
    # `python -m mmjax.hf verify` checks such a directory the same way (random images of
    # other shapes, one per row, a padded row)
    err, tol = verify(str(tmp_path), "float32", None, 3, 16, 0)
    assert err < 1e-5 and tol == 1e-4


# --------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    """A llava-hf style LLaVA-NeXT directory: tiny random CLIP + Llama, a trained tokenizer
    with <image>, transformers' own LlavaNextProcessor saved beside it, and photos of
    portrait, landscape and square shapes."""
    root = tmp_path_factory.mktemp("llava-next")
    corpus = ["a photo of a cat on the table", "USER: what is in the image? ASSISTANT: a cat",
              "Describe the image in detail.", "how many tiles are there"] * 20
    tok = bpe_tokenizer(root, corpus, vocab_size=300)
    image_id = tok.convert_tokens_to_ids("<image>")
    pins = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
    hf_cfg = tf.LlavaNextConfig(vision_config=vision_config("clip"),
                                text_config=llm_config("llama", vocab_size=len(tok),
                                                       eos_token_id=tok.eos_token_id),
                                image_grid_pinpoints=pins, image_token_index=image_id)
    model = make_model(tf.LlavaNextForConditionalGeneration, hf_cfg)
    save(model, root)
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
            image_grid_pinpoints=pins, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    proc.save_pretrained(root)
    photos = {}
    for name, arr, size in [("tall.png", data.astronaut(), (40, 90)),
                            ("wide.png", data.chelsea(), (130, 40)),
                            ("square.png", data.coffee(), (60, 60))]:
        Image.fromarray(arr).resize(size).save(root / name)  # PIL sizes are (W, H)
        photos[name] = root / name
    return root, model, proc, photos


def test_generation_on_llava_next_is_transformers(next_dir):
    """Three prompts (a tall photo, a wide and a square photo in one prompt, text only)
    through `request` and one batched engine call: the prompt ids are LlavaNextProcessor's
    (each image's token count from its size), and the greedy tokens are transformers'
    `generate` on what its processor makes of the same files."""

    root, model, proc, photos = next_dir
    m = from_hf(root, dtype="float32", template="raw")
    assert m.cfg.anyres and m.image_aspect == "anyres"
    asks = [("USER: <image>\nwhat is in the image? ASSISTANT:", ["tall.png"]),
            ("USER: <image> and <image> how many tiles are there? ASSISTANT:",
             ["wide.png", "square.png"]),
            ("USER: Describe a cat in detail. ASSISTANT:", [])]
    reqs, want = [], []
    for prompt, names in asks:
        reqs.append(request(m, [(prompt, "")], [m.read_image(photos[n]) for n in names]))
        pil = [Image.open(photos[n]).convert("RGB") for n in names]
        inputs = proc(text=prompt, images=pil or None, return_tensors="pt")
        assert reqs[-1].ids.tolist() == inputs["input_ids"][0].tolist(), prompt
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False,
                                 pad_token_id=proc.tokenizer.pad_token_id)
        ref = out[0, inputs["input_ids"].shape[1]:].tolist()
        want.append(ref[:ref.index(proc.tokenizer.eos_token_id)]
                    if proc.tokenizer.eos_token_id in ref else ref)
    got = Engine(m.model, m.params, m.tokenizer, mesh=m.mesh, rules=m.rules,
                 stop_ids=m.stop_ids()).generate(reqs, Sampling(max_new_tokens=16))
    assert [r.token_ids for r in got] == want


def test_views_for_the_wrong_model_and_wrong_counts_are_refused(next_dir):

    root, *_ = next_dir
    m = from_hf(root, dtype="float32", template="raw")
    engine = m.engine()
    (views,) = m.model_images([m.pixels(np.zeros((30, 50, 3), np.uint8))])
    ids = np.asarray([1] + [m.cfg.image_token_id] * (views.tokens - 1) + [5], np.int32)
    with pytest.raises(ValueError, match="image tokens for image"):
        engine._batch([Request(ids, [views])], 4)
    square = np.zeros((56, 56, 3), np.uint8)
    with pytest.raises(ValueError, match="takes views"):
        engine._batch([Request(ids, [square])], 4)


@pytest.mark.e2e
def test_generate_command_on_llava_next(next_dir):
    """`python -m mmjax.generate --hf NEXT_DIR` with two images of different shapes answers
    as transformers does."""
    root, model, proc, photos = next_dir
    prompt = "USER: <image> and <image> how many tiles are there? ASSISTANT:"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    r = subprocess.run([sys.executable, "-m", "mmjax.generate", "--hf", str(root), "--image",
                        str(photos["tall.png"]), "--image", str(photos["wide.png"]),
                        "--prompt", prompt, "--template", "raw", "--max-new-tokens", "16",
                        "--output", "json"], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    inputs = proc(text=prompt, images=[Image.open(photos[n]).convert("RGB")
                                       for n in ("tall.png", "wide.png")], return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=16, do_sample=False,
                             pad_token_id=proc.tokenizer.pad_token_id)[
            0, inputs["input_ids"].shape[1]:].tolist()
    eos = proc.tokenizer.eos_token_id
    assert out["token_ids"] == (ref[:ref.index(eos)] if eos in ref else ref)


# --------------------------------------------------------------------------- training
def _records(root: Path) -> Path:
    path = root / "train.json"
    path.write_text(json.dumps([
        {"id": "tall", "image": "tall.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the image?"},
            {"from": "gpt", "value": "a cat on the table"}]},
        {"id": "two", "image": ["wide.png", "square.png"], "conversations": [
            {"from": "human", "value": "<image> and <image> how many tiles are there?"},
            {"from": "gpt", "value": "a photo of a cat"},
            {"from": "human", "value": "Describe the image in detail."},
            {"from": "gpt", "value": "a cat on the table"}]}]))
    return path


@pytest.mark.parametrize("packing", ["pad", "best_fit"])
def test_training_batches_give_transformers_loss(next_dir, packing):
    """The pipeline's any-resolution batches (views per slot, image_sources; one sample per
    row, or both packed into one row) give the train step's loss that transformers'
    LlavaNextForConditionalGeneration computes on its own processor's pixels of the same
    files and the same ids and labels, sample by sample."""
    root, model, proc, photos = next_dir
    imported = load(root)
    cfg = imported.config
    tok = load_tokenizer(root)
    data = DataConfig(sources=(SourceConfig("llava_json", str(_records(root)), str(root)),),
                      image_aspect="anyres", packing=packing, max_length=512, seq_len=1024,
                      max_images_per_row=3 if packing == "best_fit" else 2, batch_size=2,
                      shuffle=False, template="vicuna_v1")
    batch = next(build_pipeline(data, tok, cfg, process_index=0, process_count=1))
    assert batch["pixel_values"].shape[2:] == (cfg.max_views, 56, 56, 3)
    assert batch["ids"][0] == (["two", "tall"] if packing == "best_fit" else ["tall"])
    trainer = Trainer(imported.model, OptimConfig())
    total, count = jax.jit(trainer.loss)(imported.params, {
        k: jnp.asarray(v) for k, v in batch.items() if k not in ("ids", "tally")})
    # the step counts the views whose features some token takes (a tile that only saw
    # padding is encoded, but unused)
    used = 0
    for name in ["tall.png"] + (["wide.png", "square.png"] if packing == "best_fit" else []):
        im = Image.open(photos[name])
        src = anyres.feature_sources(im.height, im.width, cfg.image_grid_pinpoints, 56, 14)
        used += len(np.unique(src // 16)) - 1  # less the newline's
    assert int(trainer.images({k: jnp.asarray(batch[k][:1]) for k in (
        "input_ids", "pixel_values", "image_sources")})) == used

    encoder = make_encoder(data, tok, cfg)
    want_total, want_count = 0.0, 0
    for names, rec in [(["tall.png"], 0), (["wide.png", "square.png"], 1)]:
        system, pairs = normalize_turns(json.loads((root / "train.json").read_text())[rec][
            "conversations"])
        pil = [Image.open(photos[n]).convert("RGB") for n in names]
        counts = [anyres.feature_tokens(im.height, im.width, cfg.image_grid_pinpoints, 56, 14)
                  for im in pil]
        enc = encoder.encode(system, pairs, len(names), counts)
        total_k, n = hf_loss_sum(model, enc.input_ids, enc.labels,
                                 **proc.image_processor(pil, return_tensors="pt"))
        want_total += total_k
        want_count += n
    assert int(count) == want_count
    assert abs(float(total) - want_total) / want_total < 1e-5


def _next_run_config(root: Path, steps: int = 1, extra=()):
    sources = [{"kind": "llava_json", "path": str(_records(root)), "image_root": str(root),
                "weight": 1.0}]
    return from_config(configlib.load(f"{ROOT}/configs/stage2.py", [
        f"--config.data.sources={sources!r}", f"--config.total_steps={steps}",
        "--config.batch_size=8", "--config.data.workers=0", "--config.data.max_length=512",
        "--config.log_every=1", "--config.checkpoint.save_interval=1",
        "--config.runtime.dtype=float32", f"--config.init.hf_llava={root}",
        "--config.data.image_aspect=anyres", *extra]))


def test_a_next_run_exports_to_llava_next_and_generates_from_its_checkpoint(next_dir,
                                                                              tmp_path):
    """A stage-2 run started from a LLaVA-NeXT directory: its checkpoint generates as
    transformers does on the directory, and it exports back to a directory that
    LlavaNextForConditionalGeneration and AutoProcessor (LlavaNextProcessor with the
    pinpoints and the run's chat template) load, with the same tensors, bit for bit."""
    root, model, proc, photos = next_dir
    run = make_run(tmp_path / "run", _next_run_config(root))
    m = from_checkpoint(str(run), dtype="float32", template="raw")
    assert m.cfg.anyres and m.image_aspect == "anyres"
    prompt = "USER: <image> and <image> how many tiles are there? ASSISTANT:"
    names = ["tall.png", "square.png"]
    got = m.engine().generate([request(m, [(prompt, "")], [m.read_image(photos[n])
                                                          for n in names])],
                              Sampling(max_new_tokens=16))[0]
    inputs = proc(text=prompt, images=[Image.open(photos[n]).convert("RGB") for n in names],
                  return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=16, do_sample=False,
                             pad_token_id=proc.tokenizer.pad_token_id)[
            0, inputs["input_ids"].shape[1]:].tolist()
    eos = proc.tokenizer.eos_token_id
    assert got.token_ids == (ref[:ref.index(eos)] if eos in ref else ref)

    out = export(str(run), tmp_path / "hf", dtype="float32", say=lambda _: None)
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "LlavaNextForConditionalGeneration"]
    mine, theirs = safetensors_of(out), safetensors_of(root)
    assert set(theirs) <= set(mine)
    for k, v in theirs.items():
        np.testing.assert_array_equal(mine[k], v, k)
    back = tf.LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    back_proc = tf.AutoProcessor.from_pretrained(str(out))
    assert type(back_proc).__name__ == "LlavaNextProcessor"
    assert back_proc.image_processor.image_grid_pinpoints == [list(p) for p in
                                                              m.cfg.image_grid_pinpoints]
    again = back_proc(text=prompt, images=[Image.open(photos[n]).convert("RGB") for n in names],
                      return_tensors="pt")
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert rel_err(back(**again).logits.numpy(), model(**inputs).logits.numpy()) < 1e-6


def test_stage_two_adds_any_resolution_to_a_llava_15_model(next_dir, tmp_path):
    """`llava.aspect=anyres` on a LLaVA-1.5 checkpoint (the NeXT recipe's stage 2 after the
    1.5 stage 1): the run's model takes LLaVA-NeXT's grids at the tower's size, every weight
    is the checkpoint's and the new image_newline is drawn; its batches carry views."""
    root, *_ = next_dir
    src = tmp_path / "llava15"
    tok = load_tokenizer(root)
    tok.save_pretrained(str(src))
    hf_cfg = tf.LlavaConfig(vision_config=vision_config("clip"),
                            text_config=llm_config("llama", vocab_size=len(tok)),
                            image_token_index=tok.convert_tokens_to_ids("<image>"))
    save(make_model(tf.LlavaForConditionalGeneration, hf_cfg), src)
    tc = _next_run_config(root, extra=[f"--config.init.hf_llava={src}",
                                       "--config.llava.aspect=anyres"])
    run = make_run(tmp_path / "run", tc)
    spec = model_spec.read(run)
    assert spec.cfg.image_grid_pinpoints == ((56, 112), (112, 56), (112, 112), (168, 56),
                                             (56, 168))
    params = jax.device_get(from_checkpoint(str(run), dtype="float32").params)
    original = jax.device_get(load(src).params)
    assert params["image_newline"].shape == (64,) and np.std(params["image_newline"]) > 0
    np.testing.assert_array_equal(params["projector"]["linear_1"]["kernel"],
                                  original["projector"]["linear_1"]["kernel"])


def test_data_and_model_must_agree_on_any_resolution(next_dir):
    root, *_ = next_dir
    cfg = load(root).config
    tok = load_tokenizer(root)
    with pytest.raises(ConfigError, match="set data.image_aspect=anyres"):
        build_pipeline(DataConfig(sources=(SourceConfig("llava_json", str(_records(root)),
                                                        str(root)),)), tok, cfg)
    with pytest.raises(ConfigError, match="needs a model with image_grid_pinpoints"):
        check_aspect(DataConfig(image_aspect="anyres"),
                     dataclasses.replace(cfg, image_grid_pinpoints=()))


def test_evaluate_runs_a_next_model(next_dir, tmp_path):
    """`mmjax.evaluate` with a LLaVA-NeXT directory: each image of the benchmark laid out on
    its own grid, every good question answered once and scored."""
    root, *_ = next_dir
    data = eval_fixtures.pope(tmp_path / "data")
    report = evaluate.main(["--hf", str(root), "--benchmark", "pope", "--data", str(data),
                            "--out", str(tmp_path / "out"), "--max-new-tokens", "3",
                            "--batch-size", "4"])
    lines = (tmp_path / "out" / "answers.jsonl").read_text().splitlines()
    assert len(lines) == report["answer_lines"] > 0 and report["skipped"] == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]


@pytest.mark.e2e
def test_mmjax_train_on_next_starts_at_transformers_loss_and_resumes_bitwise(next_dir,
                                                                              tmp_path):
    """`mmjax.train` (stage 2 from a NeXT directory, anyres data, 8 CPU devices): the loss
    of step 1 is transformers' forward on the same batch (its processor's pixels for each
    row's images); a run resumed from its step-2 checkpoint replays steps 3 and 4 bitwise."""
    root, model, proc, photos = next_dir
    tc = _next_run_config(root, steps=4, extra=["--config.checkpoint.save_interval=2",
                                                "--config.data.packing=pad",
                                                "--config.data.template=vicuna_v1"])
    work = tmp_path / "run"
    reference = dict(train(tc, work)["loss"])
    assert sorted(reference) == [1, 2, 3, 4]

    # step 1's batch, as the run read it, through transformers row by row
    data = tc.data_config(1)
    batch = next(build_pipeline(data, load_tokenizer(root), load(root).config))
    names = {"tall": ["tall.png"], "two": ["wide.png", "square.png"]}
    total, count = 0.0, 0
    for r, ids in enumerate(batch["ids"]):
        (sample,) = ids
        real = batch["segment_ids"][r] > 0
        labels = np.concatenate([[-100], batch["targets"][r][real][:-1]])
        pil = [Image.open(photos[n]).convert("RGB") for n in names[sample.split("#")[0]]]
        row_total, n = hf_loss_sum(model, batch["input_ids"][r][real], labels,
                                   **proc.image_processor(pil, return_tensors="pt"))
        total, count = total + row_total, count + n
    assert abs(reference[1] - total / count) < 1e-5 * abs(reference[1])

    shutil.rmtree(work / "checkpoints" / "4")  # as if killed after step 3
    again = dict(train(tc, work)["loss"])
    assert {k: again[k] for k in (3, 4)} == {k: reference[k] for k in (3, 4)}  # bitwise
