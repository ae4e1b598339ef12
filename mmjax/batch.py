"""The batch: the one format the data pipeline produces and the train step consumes.

Axis legend: B rows, T row length, M image slots per row, V views per image slot (any
resolution), S image size.

    input_ids     int32 [B, T]   token ids; every image token stands for one patch embedding
    targets       int32 [B, T]   next-token labels, shifted inside each sample (-100: no loss)
    segment_ids   int32 [B, T]   packed samples of a row numbered from 1; 0 = padding
    positions     int32 [B, T]   positions restarting at 0 for each sample
    pixel_values  uint8 [B, M, S, S, 3] (float32 when normalised on the host); any resolution
                  (LLaVA-NeXT): [B, M, V, S, S, 3], each slot's base view, then its tiles
    image_sources int32 [B, T]   any resolution only: the feature each image token takes from
                  the row's table (mmjax.models.llava; mmjax.models.anyres.row_sources);
                  OneVision: [B, T, K], K features weighted by
    image_weights float32 [B, T, K]
    ids           host only: the sample ids of each row (logs, debugging)
    tally         host only: skip counts the batch carries from the workers (data.quality)

`targets[t]` is the label of token t + 1 of the same sample, so no label crosses a sample
boundary in a packed row and the loss needs no shift.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.sharding import Rules, batch_sharding

IGNORE = -100  # label of positions without loss (prompts, images, padding)

# name -> (axes, dtype); pixel_values may be float32 (DataConfig.normalize_on_host)
FIELDS = {
    "input_ids": ("BT", np.int32),
    "targets": ("BT", np.int32),
    "segment_ids": ("BT", np.int32),
    "positions": ("BT", np.int32),
    "pixel_values": ("BMSSC", np.uint8),
}
ANYRES_FIELDS = {**FIELDS, "pixel_values": ("BMVSSC", np.uint8),
                 "image_sources": ("BT", np.int32)}
TAPS_FIELDS = {**ANYRES_FIELDS, "image_sources": ("BTK", np.int32),
               "image_weights": ("BTK", np.float32)}


def fields(views: int = 0, taps: int = 1) -> dict:
    """The device arrays of a batch: `views` > 0 for an any-resolution model's, `taps` > 1
    for OneVision's."""
    if not views:
        return FIELDS
    return TAPS_FIELDS if taps > 1 else ANYRES_FIELDS


def empty(rows: int, length: int, slots: int, image_size: int, pad_id: int,
          pixel_dtype=np.uint8, views: int = 0, taps: int = 1) -> dict[str, np.ndarray]:
    """A host batch of padding: ids `pad_id`, no targets, no segments, blank image slots
    (`views` per slot for an any-resolution model, with `image_sources`, and with `taps`
    > 1 their `image_weights`)."""
    out = {"input_ids": np.full((rows, length), pad_id, np.int32),
           "targets": np.full((rows, length), IGNORE, np.int32),
           "segment_ids": np.zeros((rows, length), np.int32),
           "positions": np.zeros((rows, length), np.int32),
           "pixel_values": np.zeros((rows, slots, *((views,) if views else ()), image_size,
                                     image_size, 3), pixel_dtype)}
    if views:
        k = (taps,) if taps > 1 else ()
        out["image_sources"] = np.zeros((rows, length) + k, np.int32)
        if k:
            out["image_weights"] = np.zeros((rows, length) + k, np.float32)
    return out


def abstract(rows: int, length: int, slots: int, image_size: int,
             pixel_dtype=np.uint8, views: int = 0, taps: int = 1
             ) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a global batch (for `jax.eval_shape` and ahead-of-time lowering)."""
    dims = {"B": rows, "T": length, "M": slots, "V": views, "S": image_size, "C": 3,
            "K": taps}
    return {k: jax.ShapeDtypeStruct(tuple(dims[a] for a in axes),
                                    pixel_dtype if k == "pixel_values" else dtype)
            for k, (axes, dtype) in fields(views, taps).items()}


def shardings(mesh, rules: Rules, views: int = 0, taps: int = 1) -> dict:
    """Each device array split over the mesh's batch axes (logical 'activation_batch')."""
    return {k: batch_sharding(mesh, len(axes), rules)
            for k, (axes, _) in fields(views, taps).items()}


def global_batch(batch: dict, mesh, rules: Rules) -> dict:
    """This process's rows -> global jax.Arrays split over the mesh's batch axes."""
    sources = batch.get("image_sources")
    sh = shardings(mesh, rules, views=int(sources is not None),
                   taps=sources.shape[-1] if sources is not None and sources.ndim == 3 else 1)
    return {k: jax.make_array_from_process_local_data(sh[k], np.asarray(batch[k]))
            for k in sh}


def normalize(pixels, mean, std):
    """uint8 [..., 3] -> float32 normalised with the tower's mean/std (numpy or jax arrays)."""
    xp = np if isinstance(pixels, np.ndarray) else jnp
    scale = xp.asarray([1 / (255.0 * s) for s in std], xp.float32)
    shift = xp.asarray([m / s for m, s in zip(mean, std)], xp.float32)
    return pixels.astype(xp.float32) * scale - shift


def device_pixels(pixel_values, vision):
    """Batch pixels on the device -> normalised float32 (a no-op for host-normalised input)."""
    if pixel_values.dtype == jnp.uint8:
        return normalize(pixel_values, vision.image_mean, vision.image_std)
    return pixel_values
