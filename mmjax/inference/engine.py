"""Batched generation with a KV cache: one prefill, then one jitted loop of decode steps.

Axis legend: B rows, P prompt length, N new tokens, M image slots per row, Y/X image size,
C channels, V vocabulary, W stop-sequence window.

A batch of requests (prompt ids with their images already expanded to image tokens, as
`ConversationEncoder.prompt_ids` lays them out) is left-padded to a bucketed length, so that
every row writes its next token into the same cache slot. The prompt runs once, filling the
cache; the decode loop (`jax.lax.while_loop`) then samples a token per row, checks the stop
conditions (stop token ids; stop strings as token sequences), and runs the one-token step,
until every row has stopped or `max_new_tokens` is reached. No Python runs per token, except
the optional streaming callback. Batch sizes, prompt lengths, image slots and reply lengths
are rounded up to a few buckets, so a handful of compiled programs serve any request mix.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import threading
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.batch import device_pixels, normalize
from mmjax.inference.sampling import Sampling, knobs, next_token
from mmjax.models.anyres import ImageViews, row_sources
from mmjax.models.kv_cache import CACHE_AXES, KVCache
from mmjax.models.llava import Llava
from mmjax.sharding import (
    batch_axes,
    batch_sharding,
    logical_shardings,
    mesh_rules,
    single_device_mesh,
)

LENGTH_BUCKETS = tuple(sorted({b * m for b in (2 ** i for i in range(3, 17)) for m in (2, 3)}))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STOP_WINDOW = 8  # stop strings are matched in the loop as up to this many tokens


def bucket(n: int, buckets: Sequence[int], multiple: int = 1) -> int:
    """The smallest bucket >= n that is a multiple of `multiple` (else n rounded up)."""
    for b in buckets:
        if b >= n and b % multiple == 0:
            return b
    return -(-n // multiple) * multiple


# XLA:CPU options for the decode loop: its matmuls have a handful of rows, and XNNPACK's
# kernels run them about 1.5x faster than the default fusions (CPU only).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_xnnpack": True}


def compile_lowered(lowered):
    """Compiles a lowered program with the platform's options (CPU: XNNPACK)."""
    if jax.devices()[0].platform == "cpu":
        try:
            return lowered.compile(compiler_options=CPU_OPTIONS)
        except Exception as e:  # an XLA build without these options: its defaults
            if "xla_cpu" not in str(e):
                raise
    return lowered.compile()


def _mesh_of(params):
    """The mesh the parameters live on (one device for unsharded ones)."""
    sharding = getattr(jax.tree_util.tree_leaves(params)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else single_device_mesh()


@dataclasses.dataclass
class Request:
    ids: np.ndarray  # int32 [L]: the prompt, each image as its image tokens
    images: Sequence[np.ndarray | ImageViews] = ()  # per image: uint8 [Y, X, C] at the
    # tower's size, or float32 already normalised; an any-resolution model's `ImageViews`;
    # one per image in the prompt, in order


@dataclasses.dataclass
class Result:
    token_ids: list[int]  # generated ids, without the stop token / stop string
    text: str
    finish: str  # 'stop' (a stop token or string) or 'length'
    logprobs: list[float] | None = None  # log p(token) under the model, per token_ids


class Engine:
    """Generates replies for batches of requests with `model` / `params` on `mesh`, split
    by the logical-axis `rules` (both from config; neither: where the parameters are)."""

    def __init__(self, model: Llava, params, tokenizer, *, mesh=None, rules=None,
                 stop_ids: Sequence[int] = (), pad_id: int | None = None,
                 batch_buckets: Sequence[int] = BATCH_BUCKETS,
                 length_buckets: Sequence[int] = LENGTH_BUCKETS,
                 on_compile: Callable[[str], None] | None = None,
                 cache_dtype: str | None = None):
        if model.rt.scan_layers:
            raise ValueError("the engine runs unscanned layers (RuntimeConfig.scan_layers="
                             "False; mmjax.models.llm.unstack_layers for scanned parameters)")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.cfg = model.cfg
        if mesh is not None and rules is None:
            raise ValueError("Engine: a mesh needs its logical-axis rules (config "
                             "logical_axis_rules)")
        # without a mesh: the parameters' own placement, nothing split by rules
        self.mesh = mesh if mesh is not None else _mesh_of(params)
        self.rules = tuple(rules or ())
        self.stop_ids = tuple(sorted({int(i) for i in stop_ids if i is not None}))
        if pad_id is None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_id = int(pad_id)
        self.batch_buckets, self.length_buckets = tuple(batch_buckets), tuple(length_buckets)
        self.row_multiple = math.prod(self.mesh.shape[a] for a in batch_axes(self.rules))
        self._programs: dict = {}
        self.on_compile = on_compile  # told what is compiling (a new shape's program)
        # the KV cache's element type (default: the compute dtype); bfloat16 halves what
        # each decode step reads of it
        self.cache_dtype = jnp.dtype(cache_dtype or model.rt.dtype)
        # the running call's token callback (streaming programs); shared with `with_params`
        # copies, whose calls run the same compiled programs
        self._stream: dict = {"callback": None}

    # ------------------------------------------------------------------ public
    def with_params(self, params) -> "Engine":
        """This engine over other parameters of the same shapes and placement (the live
        parameters of a training run): its compiled programs are shared, not rebuilt."""
        other = copy.copy(self)
        other.params = params
        return other

    def generate(self, requests: Sequence[Request], sampling: Sampling = Sampling(),
                 seed: int | jax.Array = 0, on_token: Callable[[int, int], None] | None = None
                 ) -> list[Result]:
        """Replies for `requests`, in order. `seed`: an int or a PRNG key (sampling only).
        `on_token(row, token_id)` streams each new token of each row as it is generated
        (stop tokens excluded)."""
        sampling.validate()
        if not requests:
            return []
        key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
        cap = self.batch_buckets[-1]
        if len(requests) > cap:
            out = []
            for k, start in enumerate(range(0, len(requests), cap)):
                chunk_cb = None if on_token is None else (
                    lambda r, t, s=start: on_token(s + r, t))
                out += self.generate(requests[start:start + cap], sampling,
                                     jax.random.fold_in(key, k), chunk_cb)
            return out
        batch = self._batch(requests, sampling.max_new_tokens)
        stop_seqs = self._stop_sequences(sampling.stop)
        rows = batch["ids"].shape[0]
        n_real = len(requests)
        self._stream["callback"] = None if on_token is None else (
            lambda tokens, live: [on_token(r, int(tokens[r])) for r in range(n_real) if live[r]])
        try:
            with mesh_rules(self.mesh, self.rules):
                placed = self._place(batch)
                args = (self.params, placed["ids"], placed["segment_ids"], placed["pixels"],
                        placed["sources"], placed["weights"], key, knobs(sampling, rows),
                        jnp.int32(sampling.max_new_tokens),
                        jnp.asarray(self.stop_ids or (-1,), jnp.int32), jnp.asarray(stop_seqs))
                program = self._program(batch, on_token is not None, sampling.logprobs, args)
                tokens, lengths, finished, logps = program(*args)
                tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        finally:
            self._stream["callback"] = None
        finished, logps = np.asarray(finished), np.asarray(logps)
        return [self._result(tokens[r, :lengths[r]], bool(finished[r]),
                             logps[r, :lengths[r]] if sampling.logprobs else None,
                             sampling.stop)
                for r in range(len(requests))]

    # ------------------------------------------------------------------ host side
    def _batch(self, requests: Sequence[Request], max_new: int) -> dict:
        """The requests left-padded into bucketed arrays: ids and segment_ids [B, P],
        pixels [B, M, Y, X, C] ([B, M, S, Y, X, C] any resolution) or None, and for any
        resolution each image token's feature `sources` [B, P] (OneVision: [B, P, K] with
        their `weights`)."""
        v, cfg = self.cfg.vision, self.cfg
        n = len(requests)
        rows = bucket(n, self.batch_buckets, self.row_multiple)
        longest = max(len(r.ids) for r in requests)
        length = bucket(longest, self.length_buckets)
        new = bucket(max_new, self.length_buckets)
        slots = max(len(r.images) for r in requests)
        ids = np.full((rows, length), self.pad_id, np.int32)
        seg = np.zeros((rows, length), np.int32)
        taps = (cfg.taps,) if cfg.taps > 1 else ()
        sources = np.zeros((rows, length) + taps, np.int32) if cfg.anyres else None
        weights = np.zeros((rows, length) + taps, np.float32) if taps else None
        pixels = None
        if slots:
            float_px = any(np.asarray(im).dtype != np.uint8 for r in requests
                           for im in r.images if not isinstance(im, ImageViews))
            views = (cfg.max_views,) if cfg.anyres else ()
            pixels = np.zeros((rows, slots, *views, v.image_size, v.image_size, 3),
                              np.float32 if float_px else np.uint8)
        for i, r in enumerate(requests):
            p = np.asarray(r.ids, np.int32)
            if len(p) == 0:
                raise ValueError(f"request {i}: empty prompt")
            ids[i, length - len(p):] = p
            seg[i, length - len(p):] = 1
            at = length - len(p) + np.flatnonzero(np.isin(p, self._media_ids))
            if cfg.anyres:
                self._place_views(i, r, at, pixels, sources, weights, slots)
                continue
            if len(at) != len(r.images) * cfg.image_tokens:
                raise ValueError(f"request {i}: {len(at)} image tokens for {len(r.images)} "
                                 f"image(s) of {cfg.image_tokens} tokens each")
            for m, im in enumerate(r.images):
                if isinstance(im, ImageViews):
                    raise ValueError(f"request {i} image {m}: views for a model that takes "
                                     "one square per image")
                im = np.asarray(im)
                if im.shape != (v.image_size, v.image_size, 3):
                    raise ValueError(f"request {i} image {m}: shape {im.shape}, the tower "
                                     f"takes ({v.image_size}, {v.image_size}, 3)")
                if pixels.dtype != im.dtype and im.dtype == np.uint8:  # mixed: normalise
                    im = normalize(im, v.image_mean, v.image_std)
                pixels[i, m] = im
        return {"ids": ids, "segment_ids": seg, "pixels": pixels, "sources": sources,
                "weights": weights, "new": new}

    @property
    def _media_ids(self) -> list[int]:
        """The placeholder ids image (and video) features go to."""
        return [self.cfg.image_token_id] + (
            [self.cfg.video_token_id] if self.cfg.video_token_id >= 0 else [])

    def _place_views(self, i: int, r: Request, at: np.ndarray, pixels, sources, weights,
                     slots: int):
        """An any-resolution request's views into its row's image slots, and the feature
        each of its image tokens (at positions `at`) takes (mmjax.models.anyres)."""
        cfg, v = self.cfg, self.cfg.vision
        for m, im in enumerate(r.images):
            if not isinstance(im, ImageViews):
                raise ValueError(f"request {i} image {m}: an any-resolution model takes "
                                 "views (mmjax.data.views.model_images), not one square")
        want = sum(im.tokens for im in r.images)
        if len(at) != want:
            raise ValueError(f"request {i}: {len(at)} image tokens for image(s) of {want} "
                             "tokens in all")
        k = 0
        for m, im in enumerate(r.images):
            count = len(im.pixels)
            if count > cfg.max_views or im.pixels.shape[1:] != (v.image_size, v.image_size, 3):
                raise ValueError(f"request {i} image {m}: views {im.pixels.shape}, the model "
                                 f"takes at most {cfg.max_views} of ({v.image_size}, "
                                 f"{v.image_size}, 3)")
            pixels[i, m, :count] = im.pixels if pixels.dtype == np.uint8 else normalize(
                im.pixels, v.image_mean, v.image_std)
            if (weights is None) != (im.weights is None):
                raise ValueError(f"request {i} image {m}: views laid out for another model "
                                 "(mmjax.data.views.model_images)")
            sources[i, at[k:k + im.tokens]] = row_sources(
                im.sources, count, m, slots, cfg.max_views, cfg.view_tokens)
            if weights is not None:
                weights[i, at[k:k + im.tokens]] = im.weights
            k += im.tokens

    def _place(self, batch: dict) -> dict:
        out = {}
        for k in ("ids", "segment_ids", "pixels", "sources", "weights"):
            a = batch[k]
            out[k] = None if a is None else jax.device_put(
                a, batch_sharding(self.mesh, a.ndim, self.rules))
        return out

    def _stop_sequences(self, stops: Sequence[str]) -> np.ndarray:
        """int32 [Q, W]: each stop string's tokens, right-aligned, -1 before them."""
        seqs = np.full((max(1, len(stops)), STOP_WINDOW), -1, np.int32)
        for q, s in enumerate(stops):
            ids = self.tokenizer.encode(s, add_special_tokens=False)[-STOP_WINDOW:]
            if ids:
                seqs[q, STOP_WINDOW - len(ids):] = ids
        return seqs

    def _result(self, ids: np.ndarray, stopped: bool, logps, stops) -> Result:
        ids = [int(i) for i in ids]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in stops if s and s in text), default=-1)
        if cut >= 0:  # a stop string: keep the text before it, and the tokens inside that
            text, stopped = text[:cut], True
            keep = len(ids)
            while keep and not text.startswith(
                    self.tokenizer.decode(ids[:keep], skip_special_tokens=True)):
                keep -= 1
            ids = ids[:keep]
            logps = None if logps is None else logps[:keep]
        return Result(ids, text, "stop" if stopped else "length",
                      None if logps is None else [float(x) for x in logps])

    # ------------------------------------------------------------------ device side
    def _program(self, batch: dict, stream: bool, logprobs: bool, args):
        """The compiled generation program for this batch's shapes (built once)."""
        pixels, new = batch["pixels"], batch["new"]
        key = (batch["ids"].shape, None if pixels is None else (pixels.shape, pixels.dtype.str),
               batch["sources"] is not None, new, stream, logprobs)
        if key not in self._programs:
            rows, length = batch["ids"].shape
            # said only when it takes a while (a program read from the cache does not)
            timer = threading.Timer(1.0, self.on_compile or (lambda _: None), [
                f"generation for {rows} row(s) x {length} prompt tokens, up to {new} new "
                "(once per shape)"])
            timer.start()
            try:
                run = functools.partial(self._run, new=new, stream=stream, logprobs=logprobs)
                lowered = jax.jit(run).lower(*args)
                self._programs[key] = compile_lowered(lowered)
            finally:
                timer.cancel()
        return self._programs[key]

    def _streamed(self, tokens, live):
        if self._stream["callback"] is not None:
            self._stream["callback"](np.asarray(tokens), np.asarray(live))

    def _run(self, params, ids, segment_ids, pixels, sources, weights, key, k, max_new,
             stop_ids, stop_seqs, *, new: int, stream: bool, logprobs: bool):
        """ids/segment_ids [B, P] left-padded, pixels [B, M, Y, X, C] ([B, M, S, Y, X, C]
        with sources [B, P]: any resolution) or None ->
        tokens [B, N], lengths [B], stopped [B] (by a stop token or string), log-probs
        [B, N]."""
        model, cfg = self.model, self.cfg
        rows, length = ids.shape
        positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
        cache = KVCache.empty(cfg.llm, rows, length + new, self.cache_dtype)
        cache_sh = logical_shardings(nn.LogicallyPartitioned(cache.k[0], CACHE_AXES),
                                     self.mesh, self.rules)
        cache = cache.replace(
            k=tuple(jax.lax.with_sharding_constraint(a, cache_sh) for a in cache.k),
            v=tuple(jax.lax.with_sharding_constraint(a, cache_sh) for a in cache.v))
        pv = None if pixels is None else device_pixels(pixels, cfg.vision)
        out = model.apply({"params": params}, ids, pv, positions, segment_ids, cache=cache,
                          prefill=True, last_only=True,
                          image_sources=None if pv is None else sources,
                          image_weights=None if pv is None else weights)
        logits, cache = out.logits, out.cache
        last_position = positions[:, -1]
        real = segment_ids[:, -1] != 0  # padding rows are done from the start

        def step_logits(cache, token, step):
            pos = (last_position + 1 + step)[:, None]
            out = model.apply({"params": params}, token[:, None], None, pos,
                              jnp.ones_like(pos), cache=cache)
            return out.logits[:, 0], out.cache

        def cond(s):
            return (s["step"] < max_new) & jnp.any(~s["done"])

        def body(s):
            key, sub = jax.random.split(s["key"])
            tok = next_token(s["logits"], sub, k)
            logp = jnp.zeros(tok.shape, jnp.float32)
            if logprobs:
                logp = jnp.take_along_axis(jax.nn.log_softmax(s["logits"], axis=-1),
                                           tok[:, None], axis=-1)[:, 0]
            live = ~s["done"]
            tok = jnp.where(live, tok, self.pad_id)
            recent = jnp.concatenate([s["recent"][:, 1:], tok[:, None]], axis=1)  # [B, W]
            seq_hit = jnp.any(jnp.all((stop_seqs[None] == -1) | (stop_seqs[None] ==
                                                                  recent[:, None]), axis=-1)
                              & jnp.any(stop_seqs != -1, axis=-1)[None], axis=-1)
            stop_hit = jnp.isin(tok, stop_ids) | seq_hit
            emitted = live & ~jnp.isin(tok, stop_ids)
            if stream:
                everywhere = NamedSharding(self.mesh, PartitionSpec())
                io_callback(self._streamed, None,
                            jax.lax.with_sharding_constraint(tok, everywhere),
                            jax.lax.with_sharding_constraint(emitted, everywhere), ordered=True)
            i = s["step"]
            logits, cache = step_logits(s["cache"], tok, i)
            return {"step": i + 1, "key": key, "logits": logits, "cache": cache,
                    "tokens": s["tokens"].at[:, i].set(tok),
                    "logps": s["logps"].at[:, i].set(logp),
                    "lengths": s["lengths"] + emitted.astype(jnp.int32),
                    "done": s["done"] | stop_hit, "recent": recent}

        state = {"step": jnp.int32(0), "key": key, "logits": logits[:, 0], "cache": cache,
                 "tokens": jnp.full((rows, new), self.pad_id, jnp.int32),
                 "logps": jnp.zeros((rows, new), jnp.float32),
                 "lengths": jnp.zeros((rows,), jnp.int32), "done": ~real,
                 "recent": jnp.full((rows, STOP_WINDOW), -2, jnp.int32)}
        s = jax.lax.while_loop(cond, body, state)
        # real rows are done only by a stop; padding rows were done from the start
        return s["tokens"], s["lengths"], s["done"] & real, s["logps"]
