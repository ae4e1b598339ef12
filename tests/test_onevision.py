"""LLaVA-OneVision's layouts (mmjax.models.anyres taps) against transformers 5.24's own code,
run as it is: `anyres_max_N` pooling of an image's tile grid (`pack_image_features`), the
2 x 2 pooling of video frames (`apply_pooling`), the single view of an image among several,
and the processor's token counts for all three."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
)
from transformers.models.llava_onevision.processing_llava_onevision import (
    LlavaOnevisionProcessor,
)

from mmjax.models import anyres

OV = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]  # anyres_max_9's grids
SMALL = [[28 * r, 28 * c] for r in range(1, 7) for c in range(1, 7)]  # the same at 28 px
SIZES = [(480, 640), (640, 480), (500, 500), (1, 1), (3, 700), (700, 3), (2000, 2000),
         (1536, 2304), (2304, 384), (384, 2304), (1000, 3000), (768, 1024), (3000, 1000),
         (17, 999), (2304, 2304), (4000, 300)]


def _sizes(n, seed):
    rng = np.random.default_rng(seed)
    return [(int(a), int(b)) for a, b in rng.integers(1, 3000, (n, 2))]


def _gather(table, src, wts):
    """The model's weighted gather, in torch: sum_k w_k * table[src_k]."""
    return (table[torch.from_numpy(src).long()] * torch.from_numpy(wts)[..., None]).sum(-2)


def _me(pinpoints, tile, patch):
    return types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(image_size=tile, patch_size=patch),
        image_grid_pinpoints=pinpoints))


@pytest.mark.parametrize("pinpoints,tile,patch,max_tiles", [(SMALL, 28, 14, 9),
                                                            (SMALL, 28, 7, 4),
                                                            (OV, 384, 14, 9)])
def test_pooled_tiles_are_transformers_pack_image_features(pinpoints, tile, patch, max_tiles):
    n = tile // patch
    me = _me(pinpoints, tile, patch)
    gen = torch.Generator().manual_seed(0)
    pooled = 0
    for h, w in SIZES + _sizes(30, seed=3):
        rows, cols = (s // tile for s in anyres.best_resolution(h, w, pinpoints))
        feats = torch.randn(1 + rows * cols, n * n, 4, generator=gen)
        newline = torch.randn(4, generator=gen)
        (want,), lens = LlavaOnevisionModel.pack_image_features(
            me, [feats], torch.tensor([[h, w]]), newline, f"anyres_max_{max_tiles}")
        src, wts = anyres.feature_taps(h, w, pinpoints, tile, patch, max_tiles)
        assert len(src) == int(lens[0]), (h, w)
        got = _gather(torch.cat([feats.reshape(-1, 4), newline[None]]), src, wts)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        pooled += bool((wts[:, 1:] != 0).any())
    assert pooled > 5  # the budget bites on most of these sizes


@pytest.mark.parametrize("n, frames", [(27, 3), (4, 2), (5, 1)])
def test_video_frames_are_transformers_apply_pooling(n, frames):
    me = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(image_size=n * 14, patch_size=14)))
    feats = torch.randn(frames, n * n, 6, generator=torch.Generator().manual_seed(n))
    want = LlavaOnevisionModel.apply_pooling(me, feats).reshape(-1, 6)
    newline = torch.randn(6)
    src, wts = anyres.video_taps(frames, n)
    got = _gather(torch.cat([feats.reshape(-1, 6), newline[None]]), src, wts)
    torch.testing.assert_close(got[:-1], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[-1], newline)


def test_token_counts_are_the_processors():
    """LlavaOnevisionProcessor's counts (single image, several images, video) on its
    attributes, against the taps' lengths."""
    me = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=OV), num_image_tokens=729,
        vision_aspect_ratio="anyres_max_9", vision_feature_select_strategy="full")
    me._get_unpadded_features = types.MethodType(
        LlavaOnevisionProcessor._get_unpadded_features, me)
    for h, w in SIZES + _sizes(200, seed=4):
        want = LlavaOnevisionProcessor._get_number_of_features(me, h, w, 384, 384)
        assert len(anyres.feature_taps(h, w, OV, 384, 14, 9)[0]) == want, (h, w)
    assert len(anyres.square_taps(27)[0]) == 729 + 1  # replace_image_token, several images
    want = LlavaOnevisionProcessor._get_num_multimodal_tokens(
        me, video_sizes=[(8, 384, 384)]).num_video_tokens[0]
    assert len(anyres.video_taps(8, 27)[0]) == want
