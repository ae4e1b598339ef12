"""The embedded demo (no downloads): a tiny LLaVA on a real photo, sharded over all devices.

    python -m mmjax.demo [--config configs/model.py:tiny] [--config.mesh.tensor=2 ...]

Until the training job exists this runs what the foundation has: it trains a small BPE
tokenizer on a few LLaVA-style prompts, builds a tiny random LLaVA (CLIP-style tower,
mlp2x_gelu projector, Llama decoder), preprocesses the bundled photo the LLaVA-1.5 way
(pad to square with the tower's mean colour, resize, normalise), splices its image tokens
into a vicuna-style prompt, and runs the jitted forward on a data x fsdp x tensor mesh over
every device, checking it against the unsharded forward. It prints shapes and logit stats.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from importlib import resources
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mmjax import configlib
from mmjax.data.image import preprocess
from mmjax.data.tokenizer import train_bpe_tokenizer
from mmjax.models import Llava
from mmjax.models.factory import count_params
from mmjax.sharding import batch_sharding, logical_shardings, make_mesh, mesh_rules

PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
          "USER: <image>\nWhat animal is in the picture? Answer the question using a single "
          "word or phrase. ASSISTANT:")


CONFIG = Path(__file__).resolve().parent.parent / "configs" / "model.py"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIG), help="config file[:variant]")
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)

    t0 = time.time()
    config = configlib.load(args.config, overrides)
    cfg, rt, rules = configlib.model(config), configlib.runtime(config), configlib.rules(config)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_bpe_tokenizer([PROMPT, "A cat.", "cat", "dog", "bird"] * 10,
                                  vocab_size=cfg.llm.vocab_size - 8, out_dir=tmp)
    # The tokenizer's <image> token is the model's image token; it expands to one token per
    # image patch feature before the forward.
    cfg = dataclasses.replace(cfg, image_token_id=tok.convert_tokens_to_ids("<image>"))
    ids = []
    for t in tok(PROMPT)["input_ids"]:
        ids += [t] * (cfg.image_tokens if t == cfg.image_token_id else 1)
    photo = Image.open(resources.files("mmjax.assets") / "chelsea.jpg")
    v = cfg.vision
    pixels = preprocess(photo, v.image_size, v.image_mean, v.image_std, aspect="pad")

    mesh = make_mesh(configlib.mesh_axes(config))
    batch = mesh.shape["data"] * mesh.shape["fsdp"]
    input_ids = np.tile(np.asarray(ids)[None], (batch, 1))
    pixel_values = np.tile(pixels[None, None], (batch, 1, 1, 1, 1))
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}")
    print(f"model: {config.model} (vision {v.family} {v.image_size}px/{v.patch_size}, "
          f"{v.num_layers} layers; LLM {cfg.llm.num_layers} layers, d={cfg.llm.hidden_size}); "
          f"<image> is token {cfg.image_token_id}")
    print(f"photo {photo.size} -> pixels {pixels.shape}, mean {pixels.mean():+.3f}")
    print(f"prompt: {len(ids)} tokens ({cfg.image_tokens} of them image tokens)")

    model = Llava(cfg, rt)
    init = lambda: model.init(jax.random.key(args.seed), jnp.asarray(input_ids[:1]),  # noqa
                              jnp.asarray(pixel_values[:1]))
    boxed = jax.eval_shape(init)["params"]
    shardings = logical_shardings(boxed, mesh, rules)
    with mesh_rules(mesh, rules):
        params = jax.jit(lambda: nn.unbox(init())["params"], out_shardings=shardings)()
        inputs = [jax.device_put(x, batch_sharding(mesh, x.ndim))
                  for x in (input_ids, pixel_values)]
        forward = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x))
        logits = forward(params, *inputs)
    single = model.apply({"params": jax.device_get(params)}, jnp.asarray(input_ids[:1]),
                         jnp.asarray(pixel_values[:1]))
    err = float(jnp.max(jnp.abs(logits[:1] - single)))
    last = np.asarray(logits[0, -1])
    stats = {"params": count_params(params), "logits_shape": tuple(logits.shape),
             "logits_mean": float(logits.mean()), "logits_std": float(logits.std()),
             "sharded_vs_unsharded_max_abs_diff": err, "seconds": time.time() - t0}
    embed = params["language_model"]["embed_tokens"]
    print(f"parameters: {stats['params']:,} (embedding sharded as {embed.sharding.spec})")
    print(f"logits {stats['logits_shape']}: mean {stats['logits_mean']:+.4f} std "
          f"{stats['logits_std']:.4f}; next-token argmax {int(last.argmax())} "
          f"({tok.decode([int(last.argmax())])!r}, an untrained model)")
    print(f"sharded forward vs single device: max |diff| {err:.2e}")
    print(f"done in {stats['seconds']:.1f}s")
    if err > 1e-4:
        raise SystemExit(f"sharded and unsharded forward disagree ({err:.2e})")
    return stats


if __name__ == "__main__":
    main()
