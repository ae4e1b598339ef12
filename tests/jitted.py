"""Forwards for tests, jitted: an eager Flax `apply` compiles every operation on its own
(hundreds of small XLA compiles, seconds per call on CPU); one jit compiles one program."""
from __future__ import annotations

import jax


def forward(model, variables, *args, **kwargs):
    """`model.apply(variables, *args, **kwargs)` as one jitted program (kwargs static)."""
    return jax.jit(lambda v, *a: model.apply(v, *a, **kwargs))(variables, *args)


def init(model, key, *args, **kwargs):
    """`model.init(key, *args, **kwargs)` as one jitted program (kwargs static)."""
    return jax.jit(lambda k, *a: model.init(k, *a, **kwargs))(key, *args)
