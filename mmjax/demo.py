"""The embedded demo (no downloads): a tiny LLaVA on a real photo, sharded over all devices.

    python -m mmjax.demo [--workdir /tmp/mmjax-demo]          (what `make demo` runs)
    python -m mmjax.demo --forward [--config configs/model.py:tiny] [--config.mesh.tensor=2]

By default it generates a dataset of coloured shapes (captions for stage 1; short-answer
questions with LLaVA's format prompt, multi-turn and counting for stage 2), trains a BPE
tokenizer and a tiny ViT + LLM from scratch through `mmjax.train` (stage 1, then stage 2
from stage 1's checkpoint). Stage 2 evaluates itself during training (configs/stage2.py:demo:
validation loss on held-out instructions, held-out short-answer accuracy on unseen images
and the same questions with blank images); the demo prints the last evaluation and exits
non-zero below 90%.

`--forward` shows the foundation alone: it trains a small BPE
tokenizer on a few LLaVA-style prompts, builds a tiny random LLaVA (CLIP-style tower,
mlp2x_gelu projector, Llama decoder), preprocesses the bundled photo the LLaVA-1.5 way
(pad to square with the tower's mean colour, resize, normalise), splices its image tokens
into a vicuna-style prompt, and runs the jitted forward on a data x fsdp x tensor mesh over
every device, checking it against the unsharded forward. It prints shapes and logit stats.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from importlib import resources
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import configs
from mmjax import configlib
from mmjax.data.image import preprocess
from mmjax.data.tokenizer_training import train_bpe_tokenizer
from mmjax.models import Llava, presets
from mmjax.models.factory import count_params
from mmjax.sharding import batch_sharding, logical_shardings, make_mesh, mesh_rules

PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
          "USER: <image>\nWhat animal is in the picture? Answer the question using a single "
          "word or phrase. ASSISTANT:")


CONFIGS = Path(configs.__file__).resolve().parent
CONFIG = CONFIGS / "model.py"


def forward_demo(argv=None) -> dict:
    """A sharded forward pass of a tiny random LLaVA on the bundled photo."""
    parser = argparse.ArgumentParser(description="forward pass demo")
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
        inputs = [jax.device_put(x, batch_sharding(mesh, x.ndim, rules))
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


def training_demo(workdir: Path, n_train: int = 2000, n_heldout: int = 200,
                  overrides: list[str] = ()) -> dict:
    """Generate shapes data, train a tokenizer, run stage 1 and stage 2, score held-out."""
    import json

    from mmjax import train as train_lib
    from mmjax.data.synthetic import vocabulary_text, write_split
    from mmjax.data.templates import VICUNA_SYSTEM

    t0 = time.time()
    data = workdir / "data"
    size = presets.get("demo").vision.image_size
    write_split(data, "train", n_train, size, seed=1)
    heldout = write_split(data, "heldout", n_heldout, size, seed=2)
    demo = presets.get("demo")
    tok = train_bpe_tokenizer(vocabulary_text() + [VICUNA_SYSTEM, "USER: ASSISTANT:"] * 5,
                              vocab_size=demo.llm.vocab_size, out_dir=data / "tokenizer")
    assert tok.convert_tokens_to_ids("<image>") == demo.image_token_id
    print(f"demo data: {n_train} training and {n_heldout} held-out images in {data}; "
          f"tokenizer of {len(tok)} tokens ({time.time() - t0:.0f}s)", flush=True)
    results = {}
    for stage in (1, 2):
        c = configlib.load(f"{CONFIGS}/stage{stage}.py:demo", list(overrides))
        c.tokenizer = str(data / "tokenizer")
        split = "captions" if stage == 1 else "instruct"
        c.data.sources = [{"kind": "llava_json", "path": str(data / f"train_{split}.json"),
                           "image_root": str(data), "weight": 1.0}]
        if stage == 2:
            c.init.stage1_checkpoint = str(workdir / "stage1")
        print(f"\n== stage {stage}: trains {[g for g, lr in c.optim.groups if lr]} ==",
              flush=True)
        results[stage] = train_lib.train(c, workdir / f"stage{stage}")
    # the held-out evaluation ran in stage 2 (eval.benchmarks of configs/stage2.py:demo):
    # its last report, as `python -m mmjax.evaluate --checkpoint WORKDIR/stage2` gives it
    last = max(int(p.name.removeprefix("step_")) for p in (workdir / "stage2" / "eval").iterdir())
    reports = {tag: json.loads((workdir / "stage2" / "eval" / f"step_{last}" / tag /
                                "results.json").read_text())
               for tag in ("heldout", "heldout_blank")}
    with_images, blank = (reports[t]["metrics"] for t in ("heldout", "heldout_blank"))
    items = json.loads(heldout["qa"].read_text())
    chance = float(np.mean([1 / {"colour": 4, "shape": 3, "side": 2, "count": 3}[it["kind"]]
                            for it in items]))
    print(f"\n== held-out short-answer accuracy ({len(items)} questions on {n_heldout} "
          f"unseen images; evaluated in training at step {last}) ==")
    for k in sorted(with_images):
        if k.startswith("accuracy"):
            print(f"  {k:22s} with images {with_images[k]:6.1%}   blank images {blank[k]:6.1%}")
    print(f"  chance (guessing uniformly per question kind): {chance:.1%}")
    answers = (workdir / "stage2" / "eval" / f"step_{last}" / "heldout" / "answers.jsonl")
    for line in answers.read_text().splitlines()[:3]:
        a = json.loads(line)
        print(f"  Q: {a['prompt']}  A: {a['text']!r}")
    print(f"  (TensorBoard: tensorboard --logdir {workdir / 'stage2' / 'tensorboard'}: "
          "eval/heldout/*, val/loss, example predictions)")
    wall = time.time() - t0
    print(f"demo done in {wall:.0f}s")
    return {"accuracy": with_images["accuracy"], "blank_accuracy": blank["accuracy"],
            "chance": chance, "seconds": wall}



def main(argv=None):
    parser = argparse.ArgumentParser(description="The embedded demo: two-stage training of a "
                                     "tiny LLaVA on generated shapes, then held-out accuracy.")
    parser.add_argument("--workdir", default="/tmp/mmjax-demo")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--forward", action="store_true",
                        help="only the sharded forward pass of a tiny random LLaVA")
    args, overrides = parser.parse_known_args(argv)
    if args.forward:
        return forward_demo(overrides)
    import shutil

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)  # the demo always starts from scratch
    out = training_demo(workdir, args.train_images, overrides=overrides)
    if out["accuracy"] < 0.9:
        raise SystemExit(f"demo accuracy {out['accuracy']:.1%} is below the 90% target")
    return out


if __name__ == "__main__":
    main()
