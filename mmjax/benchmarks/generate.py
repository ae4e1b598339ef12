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
runs on CPU with as many threads as JAX has cores. mmjax runs once per --cache-dtypes (the KV
cache's element type; the weights stay float32 on both sides), and each row states what a
decode step must read (the LLM's weights and the cache) against the machine's copy bandwidth
measured in the same run.

Start-up: `python -m mmjax.generate` on a tiny CLIP + Llama llava-hf directory, 16 new
tokens, run as a fresh process three times with an empty compilation cache: the first
compiles, the next ones read the program from the cache (`mmjax.compile_cache`).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

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
    parser.add_argument("--cache-dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up runs")
    args = parser.parse_args(argv)

    import jax
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    path = tempfile.mkdtemp(prefix="mmjax-bench-generate-")
    hf = _hf_model(args.layers, args.width, path)
    imported = load(path)
    cfg = imported.config
    engines = {d: Engine(imported.model, imported.params, _Ids(), cache_dtype=d)
               for d in args.cache_dtypes}
    bandwidth = copy_bandwidth()
    weights = sum(a.size * a.dtype.itemsize for a in
                  jax.tree.leaves(imported.params["language_model"]))
    print(f"model: CLIP-B/16 224px + Llama {args.layers} layers x {args.width}, vocab 32000; "
          f"{cfg.image_tokens} image tokens; {args.new} new tokens; "
          f"{jax.devices()[0].device_kind} ({jax.device_count()} device(s)), torch "
          f"{torch.get_num_threads()} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"LLM weights {weights / 1e6:.0f} MB")
    results = {}
    for rows in args.batches:
        reqs = _prompts(cfg, rows)
        prompt = len(reqs[0].ids)
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
        row = {"transformers": _rates(rows, prompt, args.new, *hft)}
        for dtype, engine in engines.items():
            def ours(n, reqs=reqs, engine=engine):
                return engine.generate(reqs, Sampling(max_new_tokens=n))

            t = time.perf_counter()
            first = ours(args.new)
            ours(1)
            compile_s = time.perf_counter() - t
            t1, tn = (_best(lambda: ours(1), args.repeats),
                      _best(lambda: ours(args.new), args.repeats))
            name = f"mmjax, {dtype} cache"
            row[name] = _rates(rows, prompt, args.new, t1, tn)
            slots = engine._batch(reqs, args.new)
            length = slots["ids"].shape[1] + slots["new"]
            cache = (2 * cfg.llm.num_layers * slots["ids"].shape[0] * cfg.llm.num_kv_heads
                     * length * cfg.llm.head_size * np.dtype(dtype).itemsize)
            row[name].update(compile_s=compile_s, cache_mb=cache / 1e6,
                             floor_ms=(weights + cache) / bandwidth * 1e3,
                             same_tokens=float(np.mean([r.token_ids == ref[i, prompt:].tolist()
                                                        for i, r in enumerate(first)])))
        results[rows] = row
        base = row["transformers"]["decode_tok_s"]
        print(f"\nbatch {rows} (prompt {prompt} tokens)")
        print(f"  {'':26s}{'prefill tok/s':>14s}{'decode tok/s':>14s}{'vs tf':>8s}"
              f"{'step ms':>9s}{'read floor ms':>15s}{'same tokens':>13s}")
        for name, r in row.items():
            extra = (f"{r['floor_ms']:15.1f}{r['same_tokens']:13.0%}" if "floor_ms" in r else "")
            print(f"  {name:26s}{r['prefill_tok_s']:14.0f}{r['decode_tok_s']:14.1f}"
                  f"{r['decode_tok_s'] / base:7.2f}x{r['step_ms']:9.1f}{extra}")
    if not args.no_startup:
        results["startup"] = startup()
    return results


def _rates(rows, prompt, new, t1, tn) -> dict:
    return {"prefill_tok_s": rows * prompt / t1,
            "decode_tok_s": rows * (new - 1) / max(tn - t1, 1e-9),
            "step_ms": max(tn - t1, 1e-9) / (new - 1) * 1e3}


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes per second of a large array copy (read + write counted once, as a decode step
    reads its weights once)."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def startup(runs: int = 3) -> dict:
    """Seconds per `python -m mmjax.generate` process on a tiny llava-hf directory: with the
    compilation cache off (every process compiles), then `runs` processes with it on, empty
    before the first."""
    import transformers as tf  # the start-up model is written with transformers

    root = Path(tempfile.mkdtemp(prefix="mmjax-bench-startup-"))
    vocab = {f"t{i}": i for i in range(300)} | {"<unk>": 300, "<image>": 301}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                      pad_token="<unk>", eos_token="t1")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.save_pretrained(root / "model")
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, image_size=56, patch_size=14)
    text = tf.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=301)).save_pretrained(
        root / "model")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(root / "red.png")
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}

    def one(cache: str) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mmjax.generate", "--hf", str(root / "model"),
                        "--image", str(root / "red.png"), "--prompt", "<image> t5 t6 t7",
                        "--max-new-tokens", "16", "--template", "raw"],
                       env=dict(env, MMJAX_CACHE_DIR=cache), check=True, capture_output=True)
        return time.perf_counter() - t

    off = one("off")
    cached = [one(str(root / "cache")) for _ in range(runs)]
    print("\nstart-up: python -m mmjax.generate, tiny CLIP + Llama, 16 new tokens: "
          f"{off:.1f} s with the compilation cache off; with it: "
          + ", ".join(f"{t:.1f} s" for t in cached) + " (the first fills it)")
    return {"cache_off_s": off, "cache_on_s": cached}


if __name__ == "__main__":
    main()
