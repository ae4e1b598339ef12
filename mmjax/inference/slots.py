"""Continuous batching: a fixed number of decode slots that requests join and leave between
steps (JetStream's scheme, on mmjax's engine).

Axis legend: S slots, R prefill rows, P prompt length (bucketed), L cache slots per decode
slot, N decode steps per call, V vocabulary.

Requests wait in a bounded queue. Between decode calls the waiting ones, as many as there
are free slots, are prefilled together (left-padded to a length bucket, as `Engine` lays a
batch out), their first tokens sampled, and their keys and values copied (one program for
the batch) into free slots of one cache [S, K, L, H], each slot with its own write position.
One compiled call then advances every live slot by N tokens (a scan of N steps), each step
with the slot's position, sampling knobs and PRNG key (a request's draws do not depend on
what shares the batch). The host reads the [N, S] new tokens (one small transfer per call:
the host's round trip is paid once per N tokens, as JetStream's engine does), streams each
slot's in order, applies the stop tokens, stop strings and length limit, drops what a slot
computed past its request's end, and frees a finished slot for the next request. A request
that arrives during a call waits at most N steps to be prefilled: N trades that wait
against the host's per-call cost. Greedy replies equal `Engine.generate`'s, token for
token, whatever else shares the batch.

Compiled programs: one decode call for the slots, one prefill and one insert per (rows,
prompt bucket, image slots): a handful serve any request mix.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.batch import device_pixels
from mmjax.inference.engine import Engine, Request, Result, bucket, compile_lowered
from mmjax.inference.sampling import Sampling, next_token_rows
from mmjax.models.kv_cache import CACHE_AXES, KVCache
from mmjax.sharding import batch_sharding, logical_shardings, mesh_rules


class QueueFull(RuntimeError):
    """The wait queue is at its bound: try again later (HTTP 429)."""


class TooLong(ValueError):
    """A prompt that leaves no room to generate in a slot's cache."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request's life in the slots. `on_token(token_id)` and `on_done(result)` are called
    from the scheduler's thread (`result` a `Result`, or the exception that ended it)."""

    request: Request
    sampling: Sampling
    seed: int = 0
    on_token: Callable[[int], None] | None = None
    on_done: Callable[[object], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    slot: int = -1
    room: int = 1 << 30  # the tokens its slot has room for
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    result: object = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> Result:
        if not self.done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


class SlotEngine:
    """`slots` decode rows over `engine`'s model, parameters, tokenizer and mesh; a cache of
    `cache_len` slots each (default: the longest prompt bucket plus `max_new_tokens`).
    `max_queue` bounds the requests waiting for a slot. `start()` runs the scheduler thread;
    `submit` hands it a request; `stop()` ends it (draining the live and waiting requests
    first, unless told not to)."""

    min_slots = 1

    def __init__(self, engine: Engine, slots: int = 8, max_prompt: int = 1024,
                 max_new_tokens: int = 256, max_queue: int = 64, cache_len: int | None = None,
                 steps_per_call: int = 4):
        self.engine = engine
        self.cfg = engine.cfg
        if slots < self.min_slots:
            raise ValueError(f"slots must be >= {self.min_slots}, got {slots}")
        if slots % engine.row_multiple:
            raise ValueError(f"slots ({slots}) must be a multiple of {engine.row_multiple}, "
                             "the rows the mesh splits a batch into")
        self.slots, self.max_queue = slots, max_queue
        self.max_prompt = max_prompt
        self.max_new_tokens = max_new_tokens
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
        self.steps_per_call = steps_per_call
        self.cache_len = cache_len or bucket(max_prompt, engine.length_buckets) + max_new_tokens
        self._programs: dict = {}
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._live: dict[int, Job] = {}
        self._free = list(range(slots))
        self._stopping = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # counters for /metrics
        self.tokens_generated = 0
        self.requests_done = 0
        self.ttft: collections.deque[float] = collections.deque(maxlen=1000)
        self._recent: collections.deque[float] = collections.deque(maxlen=256)  # token times
        self._alive: tuple = ((), None)  # (live slots, their mask on the device)
        self._state = self._empty_state() if slots else None

    # ------------------------------------------------------------------ public
    def start(self) -> "SlotEngine":
        self._thread = threading.Thread(target=self._loop, name="mmjax-slots", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Ends the scheduler: with `drain`, after every live and waiting request is done;
        without, the unfinished ones end with an error."""
        with self._lock:
            self._stopping, self._drain = True, drain
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request, sampling: Sampling = Sampling(), seed: int = 0,
               on_token: Callable[[int], None] | None = None,
               on_done: Callable[[object], None] | None = None) -> Job:
        """Queues a request. ValueError (TooLong among them) for a request no slot can take,
        QueueFull when the queue is at its bound, RuntimeError once stopping."""
        sampling.validate()
        if sampling.max_new_tokens > self.max_new_tokens:
            sampling = dataclasses.replace(sampling, max_new_tokens=self.max_new_tokens)
        self.engine._batch([request], 1)  # the engine's checks: images and tokens agree
        n = len(request.ids)
        if n > self.max_prompt:
            raise TooLong(f"the prompt has {n} tokens; this server takes at most "
                          f"{self.max_prompt}")
        job = Job(request, sampling, seed, on_token, on_done)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if self.error is not None:
                raise RuntimeError(f"the decode loop failed: {self.error}")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting for a slot")
            self._waiting.append(job)
            self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Ends a request (a client that went away): its slot is freed before the next step."""
        with self._lock:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, RuntimeError("cancelled"))

    def generate(self, requests: Sequence[Request], sampling: Sampling = Sampling(),
                 seed: int = 0) -> list[Result]:
        """Every request through the slots at once (the scheduler must be running)."""
        jobs = [self.submit(r, sampling, seed) for r in requests]
        return [j.wait() for j in jobs]

    def stats(self) -> dict:
        """Queue length, live slots, tokens/s over the last few seconds, time to first token."""
        with self._lock:
            now = time.monotonic()
            recent = [t for t in self._recent if now - t <= 10.0]
            span = now - recent[0] if len(recent) > 1 else 0.0
            rate = (len(recent) - 1) / span if span > 0 else 0.0
            return {"queue": len(self._waiting), "live": len(self._live),
                    "slots": self.slots, "tokens_generated": self.tokens_generated,
                    "requests_done": self.requests_done, "tokens_per_second": rate,
                    "ttft": list(self.ttft)}

    # ------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        """Dispatches work, then reads back the previous call's tokens while the device runs
        the new one: the device waits on the host only when nothing is queued. A decode call
        dispatched before the host saw that a slot's request ended computes that slot in
        vain (its tokens are dropped)."""
        carry = None  # the newest decode call, read after the next one is dispatched
        try:
            while True:
                with self._lock:
                    while not (self._waiting or self._live or self._stopping or carry):
                        self._lock.wait()
                    if self._stopping and not self._drain:
                        for job in [*self._waiting, *self._live.values()]:
                            self._finish(job, RuntimeError("the server stopped"))
                        self._waiting.clear()
                        return
                    if self._stopping and not (self._waiting or self._live or carry):
                        return
                    for job in [j for j in self._live.values() if j.cancelled]:
                        self._finish(job, RuntimeError("cancelled"))
                    admit = []
                    while self._waiting and len(admit) < len(self._free):
                        admit.append(self._waiting.popleft())
                first = self._admit(admit) if admit else None
                with self._lock:
                    live = dict(self._live)
                call = self._step(live) if live else None
                if carry is not None:
                    self._take(*carry)
                if first is not None:
                    self._take_first(*first)
                carry = call
        except BaseException as e:  # noqa: BLE001 - every waiting client is told
            with self._lock:
                self.error = e
                for job in [*self._waiting, *self._live.values()]:
                    self._finish(job, e)
                self._waiting.clear()
            raise

    def _admit(self, jobs: list[Job]) -> tuple:
        """Dispatches the prefill of `jobs` (together) and their copy into free slots; returns
        what `_take_first` reads back."""
        e = self.engine
        batch = e._batch([j.request for j in jobs], 1)
        rows, length = batch["ids"].shape
        where = np.full((rows,), self.slots, np.int32)  # each row's slot (none: dropped)
        seeds = np.zeros((rows,), np.uint32)
        with self._lock:
            for r, job in enumerate(jobs):
                job.slot, job.room = self._free.pop(), self.cache_len - length
                self._live[job.slot] = job
                where[r], seeds[r] = job.slot, job.seed
        k = _knobs([j.sampling for j in jobs], rows)
        with mesh_rules(e.mesh, e.rules):
            placed = e._place(batch)
            args = (e.params, placed["ids"], placed["segment_ids"], placed["pixels"],
                    placed["sources"], placed["weights"], seeds, k)
            pixels = batch["pixels"]
            shape = (rows, length, None if pixels is None else (pixels.shape, pixels.dtype.str))
            first, prefix = self._program(("prefill", shape), self._prefill, args)(*args)
            args = (self._state, prefix, where, first, seeds, k)
            insert = self._program(("insert", shape), self._insert, args, donate=0,
                                   out=self._state_sh)
            self._state = insert(*args)
        return first, jobs

    def _take_first(self, first: jax.Array, jobs: list[Job]) -> None:
        first = np.asarray(first)
        now = time.monotonic()
        for r, job in enumerate(jobs):
            self.ttft.append(now - job.submitted)
            self._emit(job, int(first[r]))

    def _step(self, live: dict[int, Job]) -> tuple:
        """Dispatches one call of `steps_per_call` tokens for every live slot; returns what
        `_take` reads back."""
        e = self.engine
        slots = tuple(sorted(live))
        if self._alive[0] != slots:  # only when the live set changed: nothing else to send
            mask = np.zeros((self.slots,), bool)
            mask[list(slots)] = True
            self._alive = (slots, jax.device_put(mask, self._tokens_sh))
        with mesh_rules(e.mesh, e.rules):
            args = (e.params, self._state, self._alive[1])
            step = self._program(("decode",), self._decode, args, donate=1,
                                 out=(self._steps_sh, self._state_sh))
            tokens, self._state = step(*args)
        return tokens, live

    def _take(self, tokens: jax.Array, live: dict[int, Job]) -> None:
        """Each live slot's tokens [N, S] in order, until its request is done (the rest,
        computed past its end, are dropped)."""
        tokens = np.asarray(tokens)
        for slot, job in live.items():
            for token in tokens[:, slot]:
                if self._emit(job, int(token)):
                    break

    def _emit(self, job: Job, token: int) -> bool:
        """Takes one new token of `job`: True when the job is finished (by it or before)."""
        if job.done.is_set():
            return True
        if job.cancelled:
            self._finish(job, RuntimeError("cancelled"))
            return True
        s = job.sampling
        if token in self.engine.stop_ids:
            self._finish(job, self.engine._result(np.asarray(job.tokens), True, None, s.stop))
            return True
        job.tokens.append(token)
        with self._lock:
            self.tokens_generated += 1
            self._recent.append(time.monotonic())
        if s.stop:  # before streaming it: a stop string never reaches the client
            text = self.engine.tokenizer.decode(job.tokens, skip_special_tokens=True)
            if any(x and x in text for x in s.stop):
                self._finish(job, self.engine._result(np.asarray(job.tokens), True, None,
                                                      s.stop))
                return True
        if job.on_token is not None:
            try:
                job.on_token(token)
            except Exception as e:  # noqa: BLE001 - a client's callback ends its own request
                self._finish(job, e)
                return True
        if len(job.tokens) >= min(s.max_new_tokens, job.room):
            self._finish(job, self.engine._result(np.asarray(job.tokens), False, None, s.stop))
            return True
        return False

    def _finish(self, job: Job, result) -> None:
        with self._lock:
            if job.done.is_set():  # its end was already told
                return
            if job.slot >= 0 and self._live.get(job.slot) is job:
                del self._live[job.slot]
                self._free.append(job.slot)
            self.requests_done += 1
            job.result = result
            job.done.set()
        if job.on_done is not None:
            job.on_done(result)

    # ------------------------------------------------------------------ device side
    def _empty_state(self) -> dict:
        """The slots' cache and next input tokens, with their fixed shardings."""
        with mesh_rules(self.engine.mesh, self.engine.rules):
            return self._make_state()

    def _make_state(self) -> dict:
        e, llm = self.engine, self.cfg.llm
        shape = jax.ShapeDtypeStruct((self.slots, llm.num_kv_heads, self.cache_len,
                                      llm.head_size), e.cache_dtype)
        kv = logical_shardings(nn.LogicallyPartitioned(shape, CACHE_AXES), e.mesh, e.rules)
        rows2, rows1 = (batch_sharding(e.mesh, n, e.rules) for n in (2, 1))
        cache = KVCache(k=(kv,) * llm.num_layers, v=(kv,) * llm.num_layers, positions=rows2,
                        segment_ids=rows2, index=rows1)
        # per slot: the next input token, and the request's seed, sampling knobs and the
        # number of tokens it has (the PRNG stream's index), set when a request comes in
        per_slot = {"tokens": jnp.int32, "seeds": jnp.uint32, "steps": jnp.int32,
                    "temperature": jnp.float32, "top_k": jnp.int32, "top_p": jnp.float32}
        self._state_sh = {"cache": cache, **{k: rows1 for k in per_slot}}
        self._tokens_sh = rows1
        self._steps_sh = NamedSharding(e.mesh, PartitionSpec())  # [N, S], read whole

        def make():
            c = KVCache.empty(llm, self.slots, self.cache_len, e.cache_dtype)
            return {"cache": c.replace(index=jnp.zeros((self.slots,), jnp.int32)),
                    **{k: jnp.zeros((self.slots,), t) for k, t in per_slot.items()}}

        return jax.jit(make, out_shardings=self._state_sh)()

    def _program(self, key: tuple, fn, args, donate: int | None = None, out=None):
        """The compiled `fn` for these arguments' shapes (built once per `key`)."""
        if key not in self._programs:
            jitted = jax.jit(fn, donate_argnums=() if donate is None else donate,
                             out_shardings=out)
            self._programs[key] = compile_lowered(jitted.lower(*args))
        return self._programs[key]

    def _prefill(self, params, ids, segment_ids, pixels, sources, weights, seeds, k):
        """ids/segment_ids [R, P] left-padded (pixels and any resolution's sources as the
        engine lays them out) -> first tokens [R] and the prompts' cache (each row draws
        with its request's seed, at index 0 of its stream)."""
        e, cfg = self.engine, self.cfg
        rows, length = ids.shape
        positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
        cache = KVCache.empty(cfg.llm, rows, length, e.cache_dtype)
        pv = None if pixels is None else device_pixels(pixels, cfg.vision)
        out = e.model.apply({"params": params}, ids, pv, positions, segment_ids, cache=cache,
                            prefill=True, last_only=True,
                            image_sources=None if pv is None else sources,
                            image_weights=None if pv is None else weights)
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 0))(seeds)
        return next_token_rows(out.logits[:, 0], keys, k), out.cache

    def _insert(self, state, prefix: KVCache, where, first, seeds, k):
        """Copies each row r of a prefill's cache into slot `where[r]` (rows whose slot is
        out of range are dropped); `first[r]` is its next input (the request's first token:
        its PRNG stream goes on at index 1), `seeds` and the knobs `k` its sampling."""
        cache = state["cache"]
        length = prefix.positions.shape[1]
        wide = ((0, 0), (0, self.cache_len - length))  # [R, P] -> [R, L], free past P

        def put(dst, src):  # dst [S, K, L, H] <- src [R, K, P, H], from the start
            return dst.at[where, :, :length].set(src.astype(dst.dtype), mode="drop")

        def row(dst, src):  # dst [S, ...] <- src [R, ...]
            return dst.at[where].set(src, mode="drop")

        cache = cache.replace(
            k=tuple(put(d, s) for d, s in zip(cache.k, prefix.k)),
            v=tuple(put(d, s) for d, s in zip(cache.v, prefix.v)),
            segment_ids=row(cache.segment_ids, jnp.pad(prefix.segment_ids, wide)),
            positions=row(cache.positions, jnp.pad(prefix.positions, wide)),
            index=row(cache.index, jnp.full(where.shape, length, jnp.int32)))
        new = {"tokens": first, "seeds": seeds, "steps": jnp.ones_like(first), **k}
        return {"cache": cache, **{n: row(state[n], v) for n, v in new.items()}}

    def _decode(self, params, state, alive):
        """`steps_per_call` tokens [N, S] for every slot: each step feeds a slot's last token
        at its next position and samples the next one (dead slots compute and are
        ignored)."""
        e = self.engine
        seg = alive.astype(jnp.int32)[:, None]

        def step(state, _):
            cache = state["cache"]
            # a slot's next position: one past its newest filled slot
            last = jnp.max(jnp.where(cache.segment_ids != 0, cache.positions, -1), axis=1)
            pos = (last + 1)[:, None]
            out = e.model.apply({"params": params}, state["tokens"][:, None], None, pos, seg,
                                cache=cache)
            keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(
                state["seeds"], state["steps"])
            tokens = next_token_rows(out.logits[:, 0], keys,
                                     {k: state[k] for k in ("temperature", "top_k", "top_p")})
            tokens = jnp.where(alive, tokens, e.pad_id)
            return {**state, "cache": out.cache, "tokens": tokens,
                    "steps": state["steps"] + 1}, tokens

        state, tokens = jax.lax.scan(step, state, length=self.steps_per_call)
        return tokens, state


class OneAtATime(SlotEngine):
    """The same queue, limits, callbacks and counters as `SlotEngine`, but each request runs
    alone through `Engine.generate` (streamed), start to end, before the next one starts:
    how a fixed-batch model worker serves (LLaVA's). The baseline of the serving benchmark
    (`mmjax.serve --slots 0`). A cancelled request ends when its reply is done."""

    min_slots = 0

    def __init__(self, engine: Engine, max_prompt: int = 1024, max_new_tokens: int = 256,
                 max_queue: int = 64):
        super().__init__(engine, 0, max_prompt, max_new_tokens, max_queue)

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._waiting or self._stopping):
                        self._lock.wait()
                    if not self._waiting or (self._stopping and not self._drain):
                        for job in self._waiting:
                            self._finish(job, RuntimeError("the server stopped"))
                        self._waiting.clear()
                        return
                    job = self._waiting.popleft()
                self._run(job)
        except BaseException as e:  # noqa: BLE001 - every waiting client is told
            with self._lock:
                self.error = e
                for job in self._waiting:
                    self._finish(job, e)
                self._waiting.clear()
            raise

    def _run(self, job: Job) -> None:
        def on_token(row: int, token: int) -> None:
            if not job.tokens:
                self.ttft.append(time.monotonic() - job.submitted)
            job.tokens.append(token)
            with self._lock:
                self.tokens_generated += 1
                self._recent.append(time.monotonic())
            if job.on_token is not None and not job.cancelled:
                job.on_token(token)

        try:
            result = self.engine.generate([job.request], job.sampling, job.seed,
                                          on_token=on_token)[0]
        except Exception as e:  # noqa: BLE001 - this request fails, the next one runs
            result = e
        self._finish(job, RuntimeError("cancelled") if job.cancelled else result)


def _knobs(samplings: Sequence[Sampling], rows: int) -> dict[str, np.ndarray]:
    """Per-row sampling knobs (rows past the requests: greedy), host arrays sent with the
    call."""
    s = list(samplings) + [Sampling()] * (rows - len(samplings))
    return {"temperature": np.asarray([x.temperature for x in s], np.float32),
            "top_k": np.asarray([x.top_k for x in s], np.int32),
            "top_p": np.asarray([x.top_p for x in s], np.float32)}
