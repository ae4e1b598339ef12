"""An lmms-eval model backed by mmjax, so lmms-eval's tasks run on mmjax models.

    pip install 'mmjax[lmms]'          # lmms-eval itself (it brings its own torch stack)
    python -m lmms_eval --model mmjax --model_args hf=/path/to/llava-hf-dir,batch_size=16 \
        --tasks pope,mme --batch_size 1 --output_path results/
    # or a training run: --model_args checkpoint=/runs/stage2[:STEP]

mmjax registers `mmjax` through the `lmms_eval.models` entry point (`manifest`). The model
implements lmms-eval's simple-model interface:

  generate_until(requests)   each request's args: (context, gen_kwargs, doc_to_visual,
                             doc_id, task, split); images from doc_to_visual(doc), the context
                             asked in the model's template (the images before the text unless
                             the context places <image>), greedy unless gen_kwargs ask to
                             sample, stopping at gen_kwargs['until'] and end of turn
  loglikelihood(requests)    args: (context, continuation or doc_to_target, doc_to_visual,
                             doc_id, task, split) -> (sum of log p(continuation tokens | prompt),
                             whether greedy decoding would produce them), one forward pass

`LmmsModel` holds the behaviour and needs nothing from lmms-eval; `MMJax` is the same class
registered as an `lmms_eval.api.model.lmms` where lmms-eval is installed.
"""
from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mmjax.batch import normalize
from mmjax.inference.load import load
from mmjax.inference.prompt import request
from mmjax.inference.sampling import Sampling


def _to_int(value, default: int) -> int:
    return default if value in (None, "") else int(value)


class LmmsModel:
    """lmms-eval's simple-model calls, answered by the KV-cache engine and the forward."""

    def __init__(self, hf: str | None = None, checkpoint: str | None = None,
                 template: str = "auto", dtype: str | None = None, batch_size: Any = 16,
                 max_new_tokens: Any = 128, **_ignored):
        self.m = load(hf, checkpoint, dtype=dtype, template=template)
        self.engine = self.m.engine()
        self.batch_size = _to_int(batch_size, 16)
        self.max_new_tokens = _to_int(max_new_tokens, 128)
        self.task_dict: dict = getattr(self, "task_dict", {})
        self._forward = jax.jit(self._logits)

    # ------------------------------------------------------------------ helpers
    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _images(self, doc_to_visual, task, split, doc_id) -> list[np.ndarray]:
        """doc_to_visual(doc) (PIL images, arrays, or None) -> uint8 at the tower's size."""
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id)) or []
        return [self.m.pixels(img if isinstance(img, Image.Image) else np.asarray(img))
                for img in visuals]

    def _sampling(self, gen_kwargs: dict) -> Sampling:
        kw = dict(gen_kwargs or {})
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kw.get("temperature") or 0.0)
        if not kw.get("do_sample", temperature > 0):
            temperature = 0.0
        return Sampling(max_new_tokens=_to_int(kw.get("max_new_tokens"), self.max_new_tokens),
                        temperature=temperature, top_p=float(kw.get("top_p") or 1.0),
                        stop=tuple(u for u in until if u))

    # ------------------------------------------------------------------ lmms-eval calls
    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        args = [r.args for r in requests]
        # requests with the same generation settings run together, batch_size at a time
        key = lambda i: repr(sorted((args[i][1] or {}).items()))  # noqa: E731
        for _, group in itertools.groupby(sorted(range(len(args)), key=key), key=key):
            group = list(group)
            sampling = self._sampling(args[group[0]][1])
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                reqs = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = args[i][:6]
                    images = self._images(doc_to_visual, task, split, doc_id)
                    reqs.append(request(self.m, [(context, "")], images))
                for i, r in zip(chunk, self.engine.generate(reqs, sampling)):
                    out[i] = r.text
        return out

    def _logits(self, params, ids, pixels):
        return self.m.model.apply({"params": params}, ids, pixels).logits

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args[:6]
            continuation = target if isinstance(target, str) else target(
                self._doc(task, split, doc_id))
            images = self._images(doc_to_visual, task, split, doc_id)
            prompt = request(self.m, [(context, "")], images).ids
            cont = np.asarray(self.m.tokenizer.encode(continuation, add_special_tokens=False),
                              np.int32)
            ids = np.concatenate([prompt, cont])[None]
            v = self.m.cfg.vision
            pixels = None
            if images:
                pixels = jnp.asarray(np.stack([normalize(x, v.image_mean, v.image_std)
                                               for x in images])[None])
            logits = np.asarray(self._forward(self.m.params, jnp.asarray(ids), pixels),
                                np.float32)[0]
            # the continuation's tokens are predicted at the positions just before them
            pred = logits[len(prompt) - 1:len(prompt) - 1 + len(cont)]
            logp = pred - _logsumexp(pred)
            out.append((float(logp[np.arange(len(cont)), cont].sum()),
                        bool(np.all(pred.argmax(-1) == cont))))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mmjax's lmms-eval model answers single-round tasks "
                                  "(generate_until, loglikelihood); multi-round tasks are not "
                                  "supported yet")


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def manifest():
    """The `lmms_eval.models` entry point: mmjax's model manifest."""
    from lmms_eval.models.registry_v2 import ModelManifest  # optional extra (lmms)

    return ModelManifest(model_id="mmjax", simple_class_path="mmjax.evaluation.lmms_adapter.MMJax")


try:
    from lmms_eval.api.model import lmms as _LMMS
except ImportError:  # lmms-eval is optional: LmmsModel alone
    _LMMS = None

if _LMMS is not None:

    class MMJax(LmmsModel, _LMMS):
        """mmjax as an lmms-eval model (`--model mmjax --model_args hf=DIR` or
        `checkpoint=WORKDIR[:STEP]`, optional template, dtype, batch_size, max_new_tokens)."""

        def __init__(self, **kwargs):
            _LMMS.__init__(self)
            LmmsModel.__init__(self, **kwargs)
