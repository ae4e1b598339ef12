"""Padding fraction of padding vs packing on a realistic LLaVA-1.5 stage-2 length mix.

    python -m mmjax.benchmarks.packing [--samples 20000] [--max-length 2048]

Lengths (tokens, 576 image tokens included for image samples) are drawn to resemble
llava_v1_5_mix665k: short-answer VQA conversations (VQAv2, GQA, OCR-VQA: several turns of a
few tokens each), LLaVA-Instruct conversations, detailed descriptions and complex reasoning,
region/REF data, and text-only ShareGPT conversations (about 6% of samples, long). Prints the
share of token slots that are padding for: one sample per row padded to max_length; padded
with length grouping into buckets; first-fit and best-fit packing into max_length rows.
"""
from __future__ import annotations

import argparse

import numpy as np

from mmjax.data.batching import pack

MIX = [  # (share, has image, text-token sampler)
    (0.42, True, lambda r: r.integers(40, 260)),  # VQA-style multi-turn short answers
    (0.09, True, lambda r: r.integers(150, 700)),  # LLaVA-Instruct conversation
    (0.04, True, lambda r: r.integers(120, 320)),  # detailed description
    (0.12, True, lambda r: r.integers(150, 450)),  # complex reasoning
    (0.27, True, lambda r: r.integers(30, 400)),  # region-level / REF / OCR
    (0.06, False, lambda r: min(int(r.lognormal(6.3, 0.7)), 2047)),  # ShareGPT text-only
]


def sample_lengths(n: int, image_tokens: int, max_length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shares = np.array([m[0] for m in MIX])
    kinds = rng.choice(len(MIX), n, p=shares / shares.sum())
    lengths, images = [], []
    for k in kinds:
        _, has_image, draw = MIX[k]
        lengths.append(min(max_length, int(draw(rng)) + (image_tokens if has_image else 0)))
        images.append(int(has_image))
    return lengths, images


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--image-tokens", type=int, default=576)
    parser.add_argument("--window", type=int, default=512, help="samples per packing window")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    lengths, images = sample_lengths(args.samples, args.image_tokens, args.max_length)
    real = sum(lengths)
    t = args.max_length
    out = {"pad": 1 - real / (len(lengths) * t)}
    buckets = (768, 1024, 1280, 1536, 2048)
    slots = 0
    for w in range(0, len(lengths), args.window):
        window = sorted(lengths[w:w + args.window])
        for b in range(0, len(window), args.batch_size):
            chunk = window[b:b + args.batch_size]
            row = next(x for x in buckets if x >= max(chunk))
            slots += args.batch_size * row
    out["pad, grouped by length into buckets"] = 1 - real / slots
    for mode in ("first_fit", "best_fit"):
        rows = 0
        for w in range(0, len(lengths), args.window):
            rows += len(pack(lengths[w:w + args.window], images[w:w + args.window], t, 8, mode))
        out[mode] = 1 - real / (rows * t)
    print(f"{len(lengths)} samples, mean {np.mean(lengths):.0f} tokens "
          f"(image samples {np.mean(images):.0%}), rows of {t}, windows of {args.window}")
    for name, frac in out.items():
        print(f"  {name:38s} padding {frac:6.1%}")
    return out


if __name__ == "__main__":
    main()
