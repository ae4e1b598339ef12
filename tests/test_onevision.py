"""LLaVA-OneVision's layouts (mmjax.models.anyres taps) against transformers 5.24's own code,
run as it is: `anyres_max_N` pooling of an image's tile grid (`pack_image_features`), the
2 x 2 pooling of video frames (`apply_pooling`), the single view of an image among several,
and the processor's token counts for all three."""
from __future__ import annotations

import base64
import io
import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import torch
import transformers as tf
from PIL import Image
from serve_fixtures import Server
from tiny_runs import make_run
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
)
from transformers.models.llava_onevision.processing_llava_onevision import (
    LlavaOnevisionProcessor,
)

from data_fixtures import bpe_tokenizer
from data_pipelines.convert import main as convert_main
from hf_fixtures import (
    hf_loss_sum,
    llm_config,
    make_model,
    rel_err,
    safetensors_of,
    save,
    vision_config,
)
from mmjax import chat, configlib, generate, predict
from mmjax.data.image import ImageError
from mmjax.data.pipeline import (
    DataConfig,
    SourceConfig,
    build_pipeline,
    make_encoder,
    skip_report,
)
from mmjax.data.templates import normalize_turns
from mmjax.data.video import frame_indices, read_frames
from mmjax.data.views import model_images
from mmjax.export import export
from mmjax.hf import load, load_tokenizer
from mmjax.hf.verify import verify
from mmjax.inference import Engine, Sampling
from mmjax.inference.load import from_hf
from mmjax.inference.prompt import request
from mmjax.models import anyres
from mmjax.serving.chat_api import Limits
from mmjax.training.config import from_config
from mmjax.training.optimizer import OptimConfig
from mmjax.training.step import Trainer

ROOT = Path(__file__).resolve().parent.parent
OV = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]  # anyres_max_9's grids
SMALL = [[28 * r, 28 * c] for r in range(1, 7) for c in range(1, 7)]  # the same at 28 px
SIZES = [(480, 640), (640, 480), (500, 500), (1, 1), (3, 700), (700, 3), (2000, 2000),
         (1536, 2304), (2304, 384), (384, 2304), (1000, 3000), (768, 1024), (3000, 1000),
         (17, 999), (2304, 2304), (4000, 300)]


def _sizes(n, seed):
    rng = np.random.default_rng(seed)
    return [(int(a), int(b)) for a, b in rng.integers(1, 3000, (n, 2))]


def _gather(table, src, wts):
    """The model's weighted gather, in torch: sum_k w_k * table[src_k]."""
    return (table[torch.from_numpy(src).long()] * torch.from_numpy(wts)[..., None]).sum(-2)


def _me(pinpoints, tile, patch):
    return types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(image_size=tile, patch_size=patch),
        image_grid_pinpoints=pinpoints))


@pytest.mark.parametrize("pinpoints,tile,patch,max_tiles", [(SMALL, 28, 14, 9),
                                                            (SMALL, 28, 7, 4),
                                                            (OV, 384, 14, 9)])
def test_pooled_tiles_are_transformers_pack_image_features(pinpoints, tile, patch, max_tiles):
    n = tile // patch
    me = _me(pinpoints, tile, patch)
    gen = torch.Generator().manual_seed(0)
    pooled = 0
    for h, w in SIZES + _sizes(30, seed=3):
        rows, cols = (s // tile for s in anyres.best_resolution(h, w, pinpoints))
        feats = torch.randn(1 + rows * cols, n * n, 4, generator=gen)
        newline = torch.randn(4, generator=gen)
        (want,), lens = LlavaOnevisionModel.pack_image_features(
            me, [feats], torch.tensor([[h, w]]), newline, f"anyres_max_{max_tiles}")
        src, wts = anyres.feature_taps(h, w, pinpoints, tile, patch, max_tiles)
        assert len(src) == int(lens[0]), (h, w)
        got = _gather(torch.cat([feats.reshape(-1, 4), newline[None]]), src, wts)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        pooled += bool((wts[:, 1:] != 0).any())
    assert pooled > 5  # the budget bites on most of these sizes


@pytest.mark.parametrize("n, frames", [(27, 3), (4, 2), (5, 1)])
def test_video_frames_are_transformers_apply_pooling(n, frames):
    me = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(image_size=n * 14, patch_size=14)))
    feats = torch.randn(frames, n * n, 6, generator=torch.Generator().manual_seed(n))
    want = LlavaOnevisionModel.apply_pooling(me, feats).reshape(-1, 6)
    newline = torch.randn(6)
    src, wts = anyres.video_taps(frames, n)
    got = _gather(torch.cat([feats.reshape(-1, 6), newline[None]]), src, wts)
    torch.testing.assert_close(got[:-1], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[-1], newline)


def test_token_counts_are_the_processors():
    """LlavaOnevisionProcessor's counts (single image, several images, video) on its
    attributes, against the taps' lengths."""
    me = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=OV), num_image_tokens=729,
        vision_aspect_ratio="anyres_max_9", vision_feature_select_strategy="full")
    me._get_unpadded_features = types.MethodType(
        LlavaOnevisionProcessor._get_unpadded_features, me)
    for h, w in SIZES + _sizes(200, seed=4):
        want = LlavaOnevisionProcessor._get_number_of_features(me, h, w, 384, 384)
        assert len(anyres.feature_taps(h, w, OV, 384, 14, 9)[0]) == want, (h, w)
    assert len(anyres.square_taps(27)[0]) == 729 + 1  # replace_image_token, several images
    want = LlavaOnevisionProcessor._get_num_multimodal_tokens(
        me, video_sizes=[(8, 384, 384)]).num_video_tokens[0]
    assert len(anyres.video_taps(8, 27)[0]) == want


# --------------------------------------------------------------------------- the model
PINS = [[56 * r, 56 * c] for r in range(1, 4) for c in range(1, 4)]  # up to 3 x 3 tiles


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    """A tiny random LlavaOnevisionForConditionalGeneration (SigLIP 56 px / 14 + Qwen2),
    anyres_max_2 so that most images are pooled, saved by transformers."""
    root = tmp_path_factory.mktemp("onevision")
    cfg = tf.LlavaOnevisionConfig(
        vision_config=vision_config("siglip"), text_config=llm_config("qwen2"),
        image_grid_pinpoints=PINS, image_token_index=126, video_token_index=125,
        vision_aspect_ratio="anyres_max_2")
    model = make_model(tf.LlavaOnevisionForConditionalGeneration, cfg)
    save(model, root)
    return root, model


def _ours(imported, ids, slots):
    """Logits of mmjax's import for one row: `slots` is a list of (views float32 [V, S, S, 3]
    normalised, taps (sources, weights) into those views), one per image slot in order."""
    cfg = imported.config
    s, p, m = cfg.max_views, cfg.view_tokens, len(slots)
    pixels = np.zeros((1, m, s, 56, 56, 3), np.float32)
    sources = np.zeros(ids.shape + (anyres.TAPS,), np.int32)
    weights = np.zeros(ids.shape + (anyres.TAPS,), np.float32)
    at = np.flatnonzero(np.isin(ids[0], [cfg.image_token_id, cfg.video_token_id]))
    k = 0
    for slot, (views, (src, wts)) in enumerate(slots):
        pixels[0, slot, :len(views)] = views
        sources[0, at[k:k + len(src)]] = anyres.row_sources(src, len(views), slot, m, s, p)
        weights[0, at[k:k + len(src)]] = wts
        k += len(src)
    assert k == len(at)
    return jax.jit(lambda prm, i, px, src, w: imported.model.apply(
        {"params": prm}, i, px, image_sources=src, image_weights=w).logits)(
        imported.params, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(sources),
        jnp.asarray(weights))


def _channels_last(x):
    return np.asarray(x.permute(0, 2, 3, 1), np.float32)


def test_an_imported_onevision_gives_transformers_logits(ov_dir):
    """One pooled image, two images (each one square view), and a 3-frame video, each in
    its own prompt, with transformers' own processors' pixels: mmjax's logits (taps from
    mmjax.models.anyres) equal transformers' within 1e-5."""
    root, model = ov_dir
    imported = load(root)
    cfg = imported.config
    assert (cfg.anyres_max, cfg.video_token_id, cfg.vision_feature_select) == (2, 125, "full")
    assert cfg.max_views == 10 and cfg.view_tokens == 16
    rng = np.random.default_rng(0)
    images = tf.LlavaOnevisionImageProcessorPil(
        size={"height": 56, "width": 56}, image_grid_pinpoints=PINS,
        image_mean=[0.5] * 3, image_std=[0.5] * 3)

    # (a) one image on a 3 x 2 grid, pooled from 12 x 8 features (anyres_max_2)
    photo = rng.integers(0, 256, (150, 100, 3), np.uint8)
    inputs = images(photo, return_tensors="pt")
    src, wts = anyres.feature_taps(150, 100, PINS, 56, 14, 2)
    assert (wts[:, 1:] != 0).any()
    ids = np.asarray([[5, 6] + [126] * len(src) + [7, 8]])
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), **inputs).logits.numpy()
    views = _channels_last(inputs["pixel_values"][0])[:int(np.prod(
        [s // 56 for s in anyres.best_resolution(150, 100, PINS)])) + 1]
    assert rel_err(_ours(imported, ids, [(views, (src, wts))]), want) < 1e-5

    # (b) two images in one prompt: one padded square view each, one newline
    pair = [rng.integers(0, 256, (40, 90, 3), np.uint8), rng.integers(0, 256, (70, 30, 3),
                                                                      np.uint8)]
    inputs = images([pair], return_tensors="pt")
    taps = anyres.square_taps(4)
    ids = np.asarray([[5] + [126] * 17 + [7] + [126] * 17 + [8]])
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), **inputs).logits.numpy()
    slots = [(_channels_last(inputs["pixel_values"][k][:1]), taps) for k in range(2)]
    assert rel_err(_ours(imported, ids, slots), want) < 1e-5

    # (c) a video of 3 frames: each pooled 2 x 2, one newline after them all
    frames = torch.tensor(rng.standard_normal((1, 3, 3, 56, 56)), dtype=torch.float32)
    src, wts = anyres.video_taps(3, 4)
    ids = np.asarray([[5, 6] + [125] * len(src) + [9]])
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), pixel_values_videos=frames).logits.numpy()
    assert rel_err(_ours(imported, ids, [(_channels_last(frames[0]), (src, wts))]),
                   want) < 1e-5
    # `python -m mmjax.hf verify` checks such a directory the same way (a random image of
    # another shape per row, a padded row)
    err, tol = verify(str(root), "float32", None, 3, 16, 0)
    assert err < 1e-5 and tol == 1e-4


# --------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def ov_chat_dir(tmp_path_factory):
    """A OneVision directory to generate with: the tiny model with a trained tokenizer
    (with <image> and <video>) and transformers' image processor saved beside it."""
    root = tmp_path_factory.mktemp("onevision-chat")
    corpus = ["a photo of a cat on the table", "USER: what is in the image? ASSISTANT: a cat",
              "compare the two pictures", "what happens in the video"] * 20
    tok = bpe_tokenizer(root, corpus, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<video>"]},
                           replace_extra_special_tokens=False)
    tok.save_pretrained(str(root))
    cfg = tf.LlavaOnevisionConfig(
        vision_config=vision_config("siglip"),
        text_config=llm_config("qwen2", vocab_size=len(tok), eos_token_id=tok.eos_token_id),
        image_grid_pinpoints=PINS, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_aspect_ratio="anyres_max_2")
    model = make_model(tf.LlavaOnevisionForConditionalGeneration, cfg)
    save(model, root)
    images = tf.LlavaOnevisionImageProcessorPil(
        size={"height": 56, "width": 56}, image_grid_pinpoints=PINS, image_mean=[0.5] * 3,
        image_std=[0.5] * 3)
    images.save_pretrained(str(root))
    return root, model, tok, images


def test_generation_on_onevision_is_transformers(ov_chat_dir):
    """A large image alone (tiled and pooled), two images in one prompt (one square view
    each) and a text-only prompt, in one batched engine call: each image's token count is
    the processor's, and the greedy tokens are transformers' `generate` on its image
    processor's pixels (batch_num_images telling it which prompt has several)."""
    root, model, tok, images = ov_chat_dir
    m = from_hf(root, dtype="float32", template="raw")
    assert m.cfg.anyres_max == 2 and m.image_aspect == "anyres"
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (150, 100, 3), np.uint8)
    pair = [rng.integers(0, 256, (40, 90, 3), np.uint8),
            rng.integers(0, 256, (70, 30, 3), np.uint8)]
    asks = [("USER: <image>\nwhat is in the image? ASSISTANT:", [big]),
            ("USER: <image> <image> compare the two pictures ASSISTANT:", pair),
            ("USER: what is a cat? ASSISTANT:", [])]
    reqs = [request(m, [(text, "")], [m.pixels(im) for im in ims]) for text, ims in asks]
    counts = [int(np.sum(r.ids == m.cfg.image_token_id)) for r in reqs]
    assert counts == [len(anyres.feature_taps(150, 100, PINS, 56, 14, 2)[0]), 2 * 17, 0]
    got = Engine(m.model, m.params, m.tokenizer, mesh=m.mesh, rules=m.rules,
                 stop_ids=m.stop_ids()).generate(reqs, Sampling(max_new_tokens=16))
    for r, (text, ims), out in zip(reqs, asks, got):
        kw = {}
        if ims:
            kw = dict(images([ims] if len(ims) > 1 else ims, return_tensors="pt"))
        with torch.no_grad():
            ref = model.generate(input_ids=torch.tensor(r.ids[None]).long(), **kw,
                                 max_new_tokens=16, do_sample=False,
                                 pad_token_id=tok.pad_token_id)[0, len(r.ids):].tolist()
        want = ref[:ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
        assert out.token_ids == want, text


def test_the_views_of_several_images_are_the_processors(ov_chat_dir):
    """An image among several: LlavaOnevisionImageProcessorPil's pad_to_square (mean colour)
    and resize, pixel for pixel; an image alone: its tiles as LLaVA-NeXT's."""
    root, _, _, images = ov_chat_dir
    m = from_hf(root, dtype="float32", template="raw")
    rng = np.random.default_rng(2)
    pair = [rng.integers(0, 256, (40, 90, 3), np.uint8),
            rng.integers(0, 256, (71, 30, 3), np.uint8)]
    want = images([pair], return_tensors="np")["pixel_values"]  # [2, 1, 3, S, S]
    for k, views in enumerate(m.model_images(pair)):
        ours = (views.pixels / 255.0 - 0.5) / 0.5
        np.testing.assert_allclose(ours, want[k].transpose(0, 2, 3, 1), atol=1e-6)
    (alone,) = m.model_images([pair[1]])
    want = images(pair[1], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose((alone.pixels / 255.0 - 0.5) / 0.5,
                               want[:len(alone.pixels)].transpose(0, 2, 3, 1), atol=1e-6)


# --------------------------------------------------------------------------- training
def test_training_batches_give_transformers_loss(ov_chat_dir, tmp_path):
    """OneVision's pipeline batches (taps and weights; a sample with one image, tiled and
    pooled, and one with two, a square view each, packed into one row) give the step's loss
    that LlavaOnevisionForConditionalGeneration computes on its image processor's pixels,
    sample by sample."""
    root, model, tok, images = ov_chat_dir
    rng = np.random.default_rng(3)
    photos = {"big.png": (150, 100), "a.png": (40, 90), "b.png": (70, 30)}
    for name, (h, w) in photos.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(tmp_path / name)
    records = [{"id": "one", "image": "big.png", "conversations": [
                    {"from": "human", "value": "<image>\nwhat is in the image?"},
                    {"from": "gpt", "value": "a cat on the table"}]},
               {"id": "two", "image": ["a.png", "b.png"], "conversations": [
                    {"from": "human", "value": "<image> <image> compare the two pictures"},
                    {"from": "gpt", "value": "a photo of a cat"}]}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    imported = load(root)
    cfg = imported.config
    data = DataConfig(sources=(SourceConfig("llava_json", str(tmp_path / "train.json"),
                                            str(tmp_path)),),
                      image_aspect="anyres", packing="best_fit", max_length=512, seq_len=1024,
                      max_images_per_row=3, batch_size=1, shuffle=False, template="vicuna_v1")
    batch = next(build_pipeline(data, load_tokenizer(root), cfg, process_index=0,
                                process_count=1))
    assert batch["ids"][0] == ["one", "two"]
    assert batch["image_sources"].shape == (1, 1024, 4) == batch["image_weights"].shape
    total, count = jax.jit(Trainer(imported.model, OptimConfig()).loss)(imported.params, {
        k: jnp.asarray(v) for k, v in batch.items() if k not in ("ids", "tally")})
    encoder = make_encoder(data, load_tokenizer(root), cfg)
    want_total, want_count = 0.0, 0
    for rec in records:
        names = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
        pil = [np.asarray(Image.open(tmp_path / n).convert("RGB")) for n in names]
        views = model_images(pil, cfg)
        system, pairs = normalize_turns(rec["conversations"])
        enc = encoder.encode(system, pairs, len(names), [v.tokens for v in views])
        total_k, n = hf_loss_sum(model, enc.input_ids, enc.labels,
                                 **images([pil] if len(pil) > 1 else pil, return_tensors="pt"))
        want_total += total_k
        want_count += n
    assert int(count) == want_count
    assert abs(float(total) - want_total) / want_total < 1e-5


def test_a_onevision_run_exports_to_onevision(ov_chat_dir, tmp_path):
    """A stage-2 run from a OneVision directory exports back to
    LlavaOnevisionForConditionalGeneration: the same tensors bit for bit, its config
    (pinpoints, anyres_max, the video token) and image processor read back by transformers."""
    root, model, tok, _ = ov_chat_dir
    sources = [{"kind": "llava_json", "path": str(tmp_path / "none.json"),
                "image_root": str(tmp_path), "weight": 1.0}]
    (tmp_path / "none.json").write_text("[]")
    tc = from_config(configlib.load(f"{ROOT}/configs/stage2.py", [
        f"--config.data.sources={sources!r}", "--config.total_steps=1",
        "--config.batch_size=8", "--config.runtime.dtype=float32",
        f"--config.init.hf_llava={root}", "--config.data.image_aspect=anyres",
        "--config.data.template=vicuna_v1"]))
    run = make_run(tmp_path / "run", tc)
    out = export(str(run), tmp_path / "hf", dtype="float32", say=lambda _: None)
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    mine, theirs = safetensors_of(out), safetensors_of(root)
    assert set(theirs) <= set(mine)
    for k, v in theirs.items():
        np.testing.assert_array_equal(mine[k], v, k)
    back = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(out)
    assert back.config.vision_aspect_ratio == "anyres_max_2"
    assert back.config.video_token_index == model.config.video_token_index
    images = tf.LlavaOnevisionImageProcessorPil.from_pretrained(str(out))
    assert images.image_grid_pinpoints == PINS


# --------------------------------------------------------------------------- video
def _write_video(path: Path, n: int, fps: int = 4, size=(48, 64)) -> None:
    """An mp4 whose frame i is a flat grey of level 20 * i (PyAV, the video extra)."""
    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full(size + (3,), 20 * i, np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_frames_are_sampled_as_llava_next_samples_them(tmp_path):
    """One frame per second of video, or `frames` spread evenly over it when that is more
    (LLaVA-NeXT's process_video_with_decord with video_fps=1, frames_upbound); decoded with
    PyAV; a file that is not a video is a counted reason, not a crash."""
    assert frame_indices(10, 4.0, frames=32) == [0, 4, 8]  # every 4th frame at 4 fps
    assert frame_indices(100, 1.0, frames=4) == [0, 33, 66, 99]  # linspace, truncated
    assert frame_indices(10, 4.0, frames=4, force=True) == [0, 3, 6, 9]
    _write_video(tmp_path / "grey.mp4", 12)
    frames = read_frames(tmp_path / "grey.mp4", frames=32)
    assert frames.shape == (3, 48, 64, 3)  # 12 frames at 4 fps: 3 seconds
    assert np.allclose(frames.mean(axis=(1, 2, 3)), [0, 80, 160], atol=3)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ImageError) as e:
        read_frames(tmp_path / "bad.mp4")
    assert e.value.reason == "corrupt_video"


def test_generation_with_a_video_is_transformers(ov_chat_dir, tmp_path):
    """`<video>` in a raw prompt with a video file: the frames sampled and laid out as
    OneVision's video (pooled 2 x 2, one newline), greedy tokens as transformers' generate
    on the same frames (pixel_values_videos; its video processor needs torchvision, which
    is not installed here)."""
    root, model, tok, _ = ov_chat_dir
    m = from_hf(root, dtype="float32", template="raw")
    _write_video(tmp_path / "clip.mp4", 12, size=(60, 80))
    video = m.read_video(tmp_path / "clip.mp4", frames=4, fps=4.0)  # 12 frames -> 4
    assert video.video and video.pixels.shape == (4, 56, 56, 3)
    prompt = "USER: <video>\nwhat happens in the video? ASSISTANT:"
    req = request(m, [(prompt, "")], [], videos=[video])
    assert int(np.sum(req.ids == m.cfg.video_token_id)) == 4 * 2 * 2 + 1
    got = m.engine().generate([req], Sampling(max_new_tokens=16))[0]
    frames = torch.tensor((video.pixels / 255.0 - 0.5) / 0.5, dtype=torch.float32)
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(req.ids[None]).long(),
                             pixel_values_videos=frames.permute(0, 3, 1, 2)[None],
                             max_new_tokens=16, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, len(req.ids):].tolist()
    assert got.token_ids == (ref[:ref.index(tok.eos_token_id)] if tok.eos_token_id in ref
                             else ref)


def test_video_records_train_with_transformers_loss(ov_chat_dir, tmp_path):
    """A LLaVA-NeXT-style video record ("video" beside the conversation, <image> in its
    text) through the pipeline: the step's loss equals LlavaOnevisionForConditionalGeneration
    on the same frames; a broken video and a missing one are counted skips."""
    root, model, tok, _ = ov_chat_dir
    _write_video(tmp_path / "clip.mp4", 12, size=(60, 80))
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    conv = [{"from": "human", "value": "<image>\nwhat happens in the video?"},
            {"from": "gpt", "value": "a cat on the table"}]
    records = [{"id": "clip", "video": "clip.mp4", "conversations": conv},
               {"id": "bad", "video": "bad.mp4", "conversations": conv},
               {"id": "gone", "video": "gone.mp4", "conversations": conv}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    imported = load(root)
    cfg = imported.config
    data = DataConfig(sources=(SourceConfig("llava_json", str(tmp_path / "train.json"),
                                            str(tmp_path)),),
                      image_aspect="anyres", max_length=512, batch_size=1, shuffle=False,
                      template="vicuna_v1", video_frames=4, video_fps=4.0, max_bad_share=1.0)
    it = build_pipeline(data, load_tokenizer(root), cfg, process_index=0, process_count=1)
    batches = list(it)
    batch = batches[0]
    assert [b["ids"][0] for b in batches if b["ids"][0]] == [["clip"]]
    assert skip_report(it).counts == {"corrupt_video": 1, "missing_image": 1}
    total, count = jax.jit(Trainer(imported.model, OptimConfig()).loss)(imported.params, {
        k: jnp.asarray(v) for k, v in batch.items() if k not in ("ids", "tally")})
    frames = batch["pixel_values"][0, 0, :4]  # the sampled frames, at the tower's size
    ids = batch["input_ids"][0][batch["segment_ids"][0] > 0]
    labels = np.concatenate([[-100], batch["targets"][0][batch["segment_ids"][0] > 0][:-1]])
    assert int(np.sum(ids == cfg.video_token_id)) == 4 * 4 + 1
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids[None]).long(),
                    labels=torch.tensor(labels[None]).long(),
                    pixel_values_videos=torch.tensor((frames / 255.0 - 0.5) / 0.5,
                                                     dtype=torch.float32)
                    .permute(0, 3, 1, 2)[None])
    n = int(np.sum(labels[1:] != -100))
    assert int(count) == n
    assert abs(float(total) / n - float(out.loss)) < 1e-5


def test_chat_about_a_video_then_an_image(ov_chat_dir, tmp_path):
    """`mmjax.chat` piped: /video, a question, /image, a question; each reply as
    `mmjax.generate` gives it for the same media and prompt."""
    root, *_ = ov_chat_dir
    _write_video(tmp_path / "clip.mp4", 8)
    Image.fromarray(np.full((50, 70, 3), 90, np.uint8)).save(tmp_path / "grey.png")
    lines = (f"/video {tmp_path / 'clip.mp4'}\nwhat happens in the video?\n"
             f"/image {tmp_path / 'grey.png'}\nwhat is in the image?\n")
    out = io.StringIO()
    replies = chat.main(["--hf", str(root), "--max-new-tokens", "6", "--frames", "4",
                         "--video-fps", "4"], stdin=io.StringIO(lines), out=out)
    assert "(video" in out.getvalue() and "(image" in out.getvalue()
    want = [generate.main(["--hf", str(root), "--max-new-tokens", "6", "--frames", "4",
                           "--video-fps", "4", "--video", str(tmp_path / "clip.mp4"),
                           "--prompt", "what happens in the video?"])["text"],
            generate.main(["--hf", str(root), "--max-new-tokens", "6", "--image",
                           str(tmp_path / "grey.png"), "--prompt",
                           "what is in the image?"])["text"]]
    assert replies == want


def test_predict_answers_video_and_several_image_questions(ov_chat_dir, tmp_path):
    """`mmjax.predict` on a question file with a video question, a two-image question and a
    text one: each answer as `mmjax.generate` gives it alone."""
    root, *_ = ov_chat_dir
    _write_video(tmp_path / "clip.mp4", 8)
    for name, level in [("a.png", 40), ("b.png", 200)]:
        Image.fromarray(np.full((50, 70, 3), level, np.uint8)).save(tmp_path / name)
    questions = [{"question_id": 1, "video": "clip.mp4", "text": "what happens in the video?"},
                 {"question_id": 2, "image": ["a.png", "b.png"],
                  "text": "<image> <image> compare the two pictures"},
                 {"question_id": 3, "text": "what is a cat?"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    common = ["--hf", str(root), "--max-new-tokens", "6", "--frames", "4", "--video-fps", "4"]
    predict.main([*common, "--questions", str(tmp_path / "q.jsonl"), "--image-root",
                  str(tmp_path), "--out", str(tmp_path / "a.jsonl")])
    got = {a["question_id"]: a["text"] for a in map(json.loads, (tmp_path / "a.jsonl")
                                                     .read_text().splitlines())}
    want = {1: generate.main([*common, "--video", str(tmp_path / "clip.mp4"), "--prompt",
                              questions[0]["text"]])["text"],
            2: generate.main([*common, "--image", str(tmp_path / "a.png"), "--image",
                              str(tmp_path / "b.png"), "--prompt", questions[1]["text"]])["text"],
            3: generate.main([*common, "--prompt", questions[2]["text"]])["text"]}
    assert got == want


def test_the_server_takes_video_and_several_image_parts(ov_chat_dir, tmp_path):
    """`mmjax.serve`'s API with the `openai` client: a video_url part (a data URL, vLLM's
    part) and a message with two image_url parts answer as `mmjax.generate` does for the
    same media."""
    root, *_ = ov_chat_dir
    _write_video(tmp_path / "clip.mp4", 8)
    for name, level in [("a.png", 40), ("b.png", 200)]:
        Image.fromarray(np.full((50, 70, 3), level, np.uint8)).save(tmp_path / name)
    m = from_hf(root, dtype="float32")
    server = Server(m, limits=Limits(max_new_tokens=8, video_frames=4, video_fps=4.0),
                    max_prompt=400)

    def url(path, kind):
        return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()

    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        ask = lambda parts: client.chat.completions.create(  # noqa: E731
            model="demo", messages=[{"role": "user", "content": parts}], max_tokens=6,
            temperature=0).choices[0].message.content
        video = ask([{"type": "video_url", "video_url": {"url": url(tmp_path / "clip.mp4",
                                                                    "video/mp4")}},
                     {"type": "text", "text": "what happens in the video?"}])
        pair = ask([{"type": "image_url", "image_url": {"url": url(tmp_path / "a.png",
                                                                   "image/png")}},
                    {"type": "image_url", "image_url": {"url": url(tmp_path / "b.png",
                                                                   "image/png")}},
                    {"type": "text", "text": "compare the two pictures"}])
    finally:
        server.close()
    common = ["--hf", str(root), "--max-new-tokens", "6", "--frames", "4", "--video-fps", "4"]
    assert video == generate.main([*common, "--video", str(tmp_path / "clip.mp4"), "--prompt",
                                   "<video>\nwhat happens in the video?"])["text"]
    assert pair == generate.main([*common, "--image", str(tmp_path / "a.png"), "--image",
                                  str(tmp_path / "b.png"), "--prompt",
                                  "<image>\n<image>\ncompare the two pictures"])["text"]


def test_video_records_built_into_arrayrecord_train_as_from_json(ov_chat_dir, tmp_path):
    """`python -m data_pipelines.convert llava` carries a video record's file into the
    ArrayRecord shards (beside image and text records); the training pipeline reads it back
    into the same batch as from the LLaVA JSON; a record with both images and a video is a
    counted skip."""
    root, *_ = ov_chat_dir
    _write_video(tmp_path / "clip.mp4", 12, size=(60, 80))
    Image.fromarray(np.full((50, 70, 3), 90, np.uint8)).save(tmp_path / "grey.png")
    conv = [{"from": "human", "value": "<image>\nwhat happens in the video?"},
            {"from": "gpt", "value": "a cat on the table"}]
    records = [{"id": "clip", "video": "clip.mp4", "conversations": conv},
               {"id": "both", "video": "clip.mp4", "image": "grey.png", "conversations": conv}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    summary = convert_main(["llava_instruct", str(tmp_path / "train.json"), "--image-root",
                            str(tmp_path), "--out", str(tmp_path / "shards"), "--no-progress"])
    assert summary["samples"] == 1 and summary["skipped"] == {"malformed_record": 1}
    cfg = load(root).config
    tok = load_tokenizer(root)

    def first_batch(source):
        data = DataConfig(sources=(source,), image_aspect="anyres", max_length=512,
                          batch_size=1, shuffle=False, template="vicuna_v1", video_frames=4,
                          video_fps=4.0, max_bad_share=1.0)
        return next(build_pipeline(data, tok, cfg, process_index=0, process_count=1))

    shards = first_batch(SourceConfig("arrayrecord", str(tmp_path / "shards" / "*.arrayrecord")))
    plain = first_batch(SourceConfig("llava_json", str(tmp_path / "train.json"), str(tmp_path)))
    for k in ("input_ids", "targets", "pixel_values", "image_sources", "image_weights"):
        np.testing.assert_array_equal(shards[k], plain[k], k)
    assert int(np.sum(shards["input_ids"] == cfg.video_token_id)) == 4 * 4 + 1
