"""LLaVA: vision tower -> projector -> LLM, with image features spliced in at image tokens.

Axis legend: B rows, M image slots per row, Y/X image size, C channels, P tokens per image,
T text length, D LLM width, E vision feature width, V vocabulary.

Images are laid out per row (`pixel_values` [B, M, Y, X, C]) so that a data-parallel shard of
the batch holds its own images: the k-th image token of a row takes the k-th feature vector
of that row's images, in order. Unused image slots (rows with fewer images, text-only rows)
are simply never read.

Any resolution (LLaVA-NeXT, `image_grid_pinpoints`): each image slot holds S views
(`pixel_values` [B, M, S, Y, X, C]: the base view, the grid's tiles, zeros in the unused
ones), and `image_sources` [B, T] names, for each image token, the feature it takes from the
row's table [M*S*P + 1, D]: the views' projected features end to end, then the learned
`image_newline`. The host computes the sources from each image's size
(mmjax.models.anyres.feature_sources, row_sources), so nothing in the step depends on image
sizes. LLaVA-OneVision pools (bilinear): its tokens take K = 4 features each,
`image_sources` [B, T, K] with `image_weights` [B, T, K] (mmjax.models.anyres.feature_taps);
a video slot's views are its frames, at `video_token_id` tokens.
"""
from __future__ import annotations

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.config import LlavaConfig, RuntimeConfig
from mmjax.models.kv_cache import KVCache
from mmjax.models.layers import param_with_axes
from mmjax.models.llm import LLM, Output, default_positions
from mmjax.models.projector import Projector
from mmjax.models.vision import VisionTower


def merge_embeddings(
    text_embeds: jax.Array,  # [B, T, D]
    image_embeds: jax.Array,  # [B, M*P, D]
    image_mask: jax.Array,  # [B, T] bool, True at image tokens
) -> jax.Array:
    """Replaces the k-th image token of each row with the k-th image embedding of the row."""
    index = jnp.cumsum(image_mask, axis=1) - 1  # [B, T]
    index = jnp.clip(index, 0, image_embeds.shape[1] - 1)
    gathered = jnp.take_along_axis(image_embeds, index[..., None], axis=1)  # [B, T, D]
    return jnp.where(image_mask[..., None], gathered.astype(text_embeds.dtype), text_embeds)


def normalized_feature_layers(cfg: LlavaConfig) -> tuple[int, ...]:
    """Feature layers as indices into hidden states 0..num_layers (0 = embeddings)."""
    n = cfg.vision.num_layers
    return tuple(layer % (n + 1) for layer in cfg.feature_layers)


class Llava(nn.Module):
    cfg: LlavaConfig
    rt: RuntimeConfig = RuntimeConfig()

    def setup(self):
        c = self.cfg
        layers = normalized_feature_layers(c)
        self.vision_tower = VisionTower(c.vision, self.rt, depth=max(layers), keep=layers)
        self.projector = Projector(c.projector, c.vision.hidden_size * len(layers),
                                   c.llm.hidden_size, self.rt)
        self.language_model = LLM(c.llm, self.rt)
        if c.anyres:
            d = c.llm.hidden_size
            self.image_newline = param_with_axes(
                self, "image_newline", nn.initializers.normal(d ** -0.5), (d,),
                self.rt.param_dtype, ("embed",))

    def encode_images(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, M, Y, X, C] (any resolution: [B, M, S, Y, X, C], the views of
        each image slot) -> projected image tokens [B, M*P, D] ([B, M*S*P, D])."""
        if pixel_values.ndim == 6:
            pixel_values = einops.rearrange(pixel_values, "B M S Y X C -> B (M S) Y X C")
        b, m = pixel_values.shape[:2]
        flat = einops.rearrange(pixel_values, "B M Y X C -> (B M) Y X C")
        hidden = self.vision_tower(flat)  # [len(feature_layers), (B M), L, E]
        feats = jnp.concatenate(list(hidden), axis=-1)
        if self.cfg.vision_feature_select == "default":
            feats = feats[:, 1:]  # transformers' meaning: the first token, CLS or not
        tokens = self.projector(feats)  # [(B M), P, D]
        return einops.rearrange(tokens, "(B M) P D -> B (M P) D", B=b, M=m)

    def __call__(
        self,
        input_ids: jax.Array,  # [B, T]
        pixel_values: jax.Array | None = None,  # [B, M, Y, X, C] ([B, M, S, Y, X, C]), normalised
        positions: jax.Array | None = None,  # [B, T]
        segment_ids: jax.Array | None = None,  # [B, T], 0 = padding
        cache: KVCache | None = None,  # decoding: see LLM.decode
        prefill: bool = False,
        last_only: bool = False,
        head: bool = True,
        image_sources: jax.Array | None = None,  # [B, T] any resolution: see the module doc
        image_weights: jax.Array | None = None,  # [B, T, K] OneVision (sources [B, T, K])
    ) -> Output:
        """`Output`: final hidden states [B, T, D], logits [B, T, V] float32 (not with
        `head=False`: the training loss applies `head_weight` in chunks), and with a cache
        the cache with the T tokens appended."""
        positions, segment_ids = default_positions(input_ids, positions, segment_ids)
        lm = self.language_model
        is_image = input_ids == self.cfg.image_token_id
        if self.cfg.video_token_id >= 0:
            is_image |= input_ids == self.cfg.video_token_id
        # The image token id may lie outside the text vocabulary: never look it up.
        embeds = lm.embed(jnp.where(is_image, 0, input_ids))
        if pixel_values is not None:
            image = self.encode_images(pixel_values)
            if self.cfg.anyres:
                if image_sources is None:
                    raise ValueError("an any-resolution model needs image_sources "
                                     "(mmjax.models.anyres.row_sources)")
                newline = jnp.broadcast_to(self.image_newline.astype(image.dtype),
                                           (image.shape[0], 1, image.shape[-1]))
                table = jnp.concatenate([image, newline], axis=1)  # [B, M*S*P + 1, D]
                picked = self._gather(table, image_sources, image_weights)
                embeds = jnp.where(is_image[..., None], picked.astype(embeds.dtype), embeds)
            else:
                embeds = merge_embeddings(embeds, image, is_image)
        return lm.decode(embeds, positions, segment_ids, cache=cache, prefill=prefill,
                         last_only=last_only, head=head)

    @staticmethod
    def _gather(table, sources, weights):
        """table [B, F, D], sources [B, T] -> [B, T, D]; or sources and weights [B, T, K]
        -> the weighted sums of K features."""
        if sources.ndim == 2:
            return jnp.take_along_axis(table, sources[..., None], axis=1)
        if weights is None:
            raise ValueError("image_sources [B, T, K] need their image_weights")
        out = 0  # in float32, as PyTorch's interpolation computes
        for k in range(sources.shape[-1]):
            out = out + weights[..., k, None].astype(jnp.float32) * jnp.take_along_axis(
                table, sources[..., k, None], axis=1).astype(jnp.float32)
        return out.astype(table.dtype)

    def head_weight(self) -> jax.Array:
        """The LLM's output projection [D, V] (parameter dtype)."""
        return self.language_model.head_weight()
