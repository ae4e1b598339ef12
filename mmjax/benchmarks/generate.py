"""Generation throughput: the mmjax engine against transformers' `generate`, same weights.

    python -m mmjax.benchmarks.generate [--layers 4] [--width 512] [--new 64] [--batches 1 16]

A random LLaVA (CLIP-B/16 tower at 224 px, a Llama decoder of --layers x --width with a
32000-token vocabulary) is saved with transformers' `save_pretrained`, imported into mmjax,
and both generate greedily from the same prompts (one image + 40 text tokens per row) with
EOS off, so both produce exactly --new tokens. Prefill time is a 1-token generation; decode
time is the rest of an N-token generation, so

    prefill tokens/s = rows x prompt tokens / t(1)
    decode tokens/s  = rows x (N - 1) / (t(N) - t(1))

best of --repeats after one warm-up run (mmjax compile time is reported on its own). PyTorch
runs on CPU with as many threads as JAX has cores.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from mmjax.hf import load
from mmjax.inference import Engine, Request, Sampling


def _hf_model(layers: int, width: int, path: str):
    import torch
    import transformers as tf

    vision = tf.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, image_size=224, patch_size=16)
    text = tf.LlamaConfig(vocab_size=32000, hidden_size=width, intermediate_size=width * 8 // 3,
                          num_hidden_layers=layers, num_attention_heads=width // 64,
                          num_key_value_heads=width // 64, max_position_embeddings=4096)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=31999)
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(cfg).eval().float()
    model.save_pretrained(path, safe_serialization=True)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _prompts(cfg, rows: int, text_tokens: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = cfg.vision.image_size
    out = []
    for _ in range(rows):
        ids = np.concatenate([[1], [cfg.image_token_id] * cfg.image_tokens,
                              rng.integers(3, 31000, text_tokens)]).astype(np.int32)
        image = rng.normal(size=(size, size, 3)).astype(np.float32)
        out.append(Request(ids, [image]))
    return out


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


class _Ids:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return ""

    def encode(self, text, add_special_tokens=False):
        return []


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import jax
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    path = tempfile.mkdtemp(prefix="mmjax-bench-generate-")
    hf = _hf_model(args.layers, args.width, path)
    imported = load(path)
    cfg = imported.config
    engine = Engine(imported.model, imported.params, _Ids())
    print(f"model: CLIP-B/16 224px + Llama {args.layers} layers x {args.width}, vocab 32000; "
          f"{cfg.image_tokens} image tokens; {args.new} new tokens; "
          f"{jax.devices()[0].device_kind} ({jax.device_count()} device(s)), torch "
          f"{torch.get_num_threads()} threads")
    results = {}
    for rows in args.batches:
        reqs = _prompts(cfg, rows)
        prompt = len(reqs[0].ids)

        def ours(n, reqs=reqs):
            return engine.generate(reqs, Sampling(max_new_tokens=n))

        t = time.perf_counter()
        first = ours(args.new)
        ours(1)
        compile_s = time.perf_counter() - t
        mine = (_best(lambda: ours(1), args.repeats),
                _best(lambda: ours(args.new), args.repeats))

        ids = torch.tensor(np.stack([r.ids for r in reqs]), dtype=torch.long)
        pixels = torch.tensor(np.stack([r.images[0] for r in reqs])).permute(0, 3, 1, 2)

        def theirs(n, ids=ids, pixels=pixels):
            with torch.no_grad():
                return hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False)

        ref = theirs(args.new)
        theirs(1)
        hft = (_best(lambda: theirs(1), args.repeats),
               _best(lambda: theirs(args.new), args.repeats))
        same = float(np.mean([r.token_ids == ref[i, prompt:].tolist()
                              for i, r in enumerate(first)]))
        row = {}
        for name, (t1, tn) in (("mmjax", mine), ("transformers", hft)):
            row[name] = {"prefill_tok_s": rows * prompt / t1,
                         "decode_tok_s": rows * (args.new - 1) / max(tn - t1, 1e-9)}
        row["compile_s"] = compile_s
        row["same_tokens"] = same
        results[rows] = row
        print(f"\nbatch {rows} (prompt {prompt} tokens; mmjax compile {compile_s:.1f}s; "
              f"greedy tokens equal to transformers' in {same:.0%} of rows)")
        print(f"  {'':14s}{'prefill tok/s':>15s}{'decode tok/s':>15s}")
        for name in ("mmjax", "transformers"):
            print(f"  {name:14s}{row[name]['prefill_tok_s']:15.0f}"
                  f"{row[name]['decode_tok_s']:15.1f}")
        print(f"  {'ratio':14s}"
              f"{row['mmjax']['prefill_tok_s'] / row['transformers']['prefill_tok_s']:14.2f}x"
              f"{row['mmjax']['decode_tok_s'] / row['transformers']['decode_tok_s']:14.2f}x")
    return results


if __name__ == "__main__":
    main()
