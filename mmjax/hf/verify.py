"""Checks an imported checkpoint against transformers' PyTorch model on random inputs.

    python -m mmjax.hf verify /path/to/local/hf/dir [--dtype bfloat16] [--tol 1e-4]

Imports the checkpoint, runs mmjax and transformers on the same random token ids (and random
images for LLaVA and vision checkpoints), prints the max relative error of the logits
(max |ours - ref| / max |ref|, the vision features for vision towers) and exits 1 when it is
above the tolerance for the dtype. The reference always runs in float32.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.hf.loader import load
from mmjax.hf.weight_files import CheckpointError
from mmjax.models import anyres
from mmjax.models.config import LlavaConfig, RuntimeConfig, VisionConfig

TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def relative_error(ours, ref, mask=None) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        ours, ref = ours[mask], ref[mask]
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def random_inputs(cfg, batch: int, seq: int, seed: int):
    """(ids [B,T], pixels [B,1,S,S,3] or None, segment ids [B,T]); row 1 padded on the right.
    An any-resolution model gets (ids, pixels [B,1,V,S,S,3], segment ids, sources [B,T],
    image sizes [B,2], None): a random image per row, each of another shape; OneVision's
    sources [B,T,4] and their weights [B,T,4] in place of the None."""
    rng = np.random.default_rng(seed)
    if isinstance(cfg, VisionConfig):
        s = cfg.image_size
        return None, rng.normal(size=(batch, s, s, 3)).astype(np.float32), None
    if isinstance(cfg, LlavaConfig) and cfg.anyres:
        return _anyres_inputs(cfg, batch, seq, rng)
    llm = cfg.llm if isinstance(cfg, LlavaConfig) else cfg
    vocab = llm.vocab_size
    n_img = cfg.image_tokens if isinstance(cfg, LlavaConfig) else 0
    t = seq + n_img
    ids = rng.integers(0, vocab, (batch, t))
    pixels = None
    if isinstance(cfg, LlavaConfig):
        ids[ids == cfg.image_token_id] = 0
        ids[:, 1:1 + n_img] = cfg.image_token_id
        s = cfg.vision.image_size
        pixels = rng.normal(size=(batch, 1, s, s, 3)).astype(np.float32)
    seg = np.ones((batch, t), np.int32)
    if batch > 1:
        seg[1, t - max(1, seq // 4):] = 0
    return ids, pixels, seg


def _anyres_inputs(cfg: LlavaConfig, batch: int, seq: int, rng):
    if cfg.vision_feature_select == "full" and cfg.vision.has_cls:
        raise ConfigError("verify: LLaVA-NeXT with the 'full' feature strategy on a tower "
                          "with a CLS token is not laid out yet")
    v, pins = cfg.vision, [list(p) for p in cfg.image_grid_pinpoints]
    s, n_views, p = v.image_size, cfg.max_views, cfg.view_tokens
    sizes = [(int(rng.integers(s // 4, 3 * s)), int(rng.integers(s // 4, 3 * s)))
             for _ in range(batch)]
    counts = [anyres.feature_tokens(h, w, pins, s, v.patch_size) for h, w in sizes]
    t = seq + max(counts)
    ids = rng.integers(0, cfg.llm.vocab_size, (batch, t))
    ids[np.isin(ids, [cfg.image_token_id, cfg.video_token_id])] = 0
    pixels = np.zeros((batch, 1, n_views, s, s, 3), np.float32)
    taps = (cfg.taps,) if cfg.anyres_max else ()
    sources = np.zeros((batch, t) + taps, np.int32)
    weights = np.zeros((batch, t) + taps, np.float32) if taps else None
    seg = np.ones((batch, t), np.int32)
    for b, (h, w) in enumerate(sizes):
        views, _ = anyres.views(rng.integers(0, 256, (h, w, 3), np.uint8), pins, s)
        pixels[b, 0, :len(views)] = (views / 255 - np.asarray(v.image_mean)) / np.asarray(
            v.image_std)
        if taps:
            src, wts = anyres.feature_taps(h, w, pins, s, v.patch_size, cfg.anyres_max)
            weights[b, 1:1 + len(src)] = wts
        else:
            src = anyres.feature_sources(h, w, pins, s, v.patch_size)
        src = anyres.row_sources(src, len(views), 0, 1, n_views, p)
        ids[b, 1:1 + len(src)] = cfg.image_token_id
        sources[b, 1:1 + len(src)] = src
        if b:  # later rows end in padding
            seg[b, t - max(1, seq // 4):] = 0
    return ids, pixels, seg, sources, np.asarray(sizes), weights


def ours_forward(imported, ids, pixels, seg, sources=None, weights=None):
    """mmjax's output on the inputs, one jitted forward (eager, every op compiles alone)."""
    cfg, model = imported.config, imported.model
    if isinstance(cfg, VisionConfig):
        fn = jax.jit(lambda p, x: model.apply({"params": p}, x)[-1])
        return fn(imported.params, jnp.asarray(pixels))
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    if isinstance(cfg, LlavaConfig) and cfg.anyres:
        fn = jax.jit(lambda p, i, x, q, g, src, w: model.apply(
            {"params": p}, i, x, q, g, image_sources=src, image_weights=w).logits)
        return fn(imported.params, *map(jnp.asarray, (ids, pixels, pos, seg, sources)),
                  None if weights is None else jnp.asarray(weights))
    if isinstance(cfg, LlavaConfig):
        fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a).logits)
        return fn(imported.params, *map(jnp.asarray, (ids, pixels, pos, seg)))
    fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a).logits)
    return fn(imported.params, *map(jnp.asarray, (ids, pos, seg)))


def reference_forward(directory, arch: str, ids, pixels, seg, image_sizes=None):
    # torch is optional (the test extra): the reference is transformers' PyTorch model
    import torch
    import transformers

    cls = getattr(transformers, arch)
    model = cls.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True,
                                trust_remote_code=False, attn_implementation="eager").eval()
    with torch.no_grad():
        if arch in ("CLIPModel", "SiglipModel", "CLIPVisionModel", "SiglipVisionModel"):
            tower = model.vision_model if hasattr(model, "vision_model") else model
            px = torch.tensor(pixels).permute(0, 3, 1, 2)
            return tower(pixel_values=px, output_hidden_states=True).hidden_states[-1].numpy()
        kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(seg),
                  position_ids=torch.tensor(np.broadcast_to(np.arange(ids.shape[1]), ids.shape)))
        if pixels is not None and image_sizes is not None:  # any resolution: views per image
            kw["pixel_values"] = torch.tensor(pixels[:, 0]).permute(0, 1, 4, 2, 3)
            kw["image_sizes"] = torch.tensor(image_sizes)
        elif pixels is not None:
            kw["pixel_values"] = torch.tensor(pixels[:, 0]).permute(0, 3, 1, 2)
        return model(**kw).logits.float().numpy()


def verify(directory, dtype: str = "float32", tol: float | None = None, batch: int = 2,
           seq: int = 32, seed: int = 0, allow_pickle: bool = False) -> tuple[float, float]:
    """(max relative error, tolerance); raises ImportError when torch is missing."""
    import torch  # noqa: F401  (optional; fail before the import work when it is missing)

    tol = TOLERANCE[dtype] if tol is None else tol
    t0 = time.time()
    imported = load(directory, RuntimeConfig(dtype=dtype, param_dtype=dtype),
                    allow_pickle=allow_pickle)
    print(f"imported {imported.architecture} from {directory} in {time.time() - t0:.1f}s "
          f"({len(imported.unused)} checkpoint tensors unused)")
    ids, pixels, seg, *anyres_args = random_inputs(imported.config, batch, seq, seed)
    sources, sizes, weights = anyres_args or (None, None, None)
    ours = np.asarray(ours_forward(imported, ids, pixels, seg, sources, weights), np.float32)
    ref = reference_forward(directory, imported.architecture, ids, pixels, seg, sizes)
    mask = None if seg is None else seg.astype(bool)
    return relative_error(ours, ref, mask), tol


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmjax.hf")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="compare an imported checkpoint with transformers")
    v.add_argument("directory")
    v.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    v.add_argument("--tol", type=float, default=None, help="default: by dtype " + str(TOLERANCE))
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--seq", type=int, default=32, help="text tokens per sample")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--allow-pickle", action="store_true",
                   help="also load .bin/.pt pickle weights (only for files you trust)")
    args = parser.parse_args(argv)
    try:
        err, tol = verify(args.directory, args.dtype, args.tol, args.batch, args.seq, args.seed,
                          args.allow_pickle)
    except ImportError as e:
        if "torch" not in str(e):
            raise
        print("verify needs PyTorch as the reference: pip install torch "
              "(or pip install 'mmjax[test]')", file=sys.stderr)
        return 2
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = err <= tol
    print(f"max relative error: {err:.3e} "
          f"(tolerance {tol:.1e} for {args.dtype}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1
