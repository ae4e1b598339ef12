"""What an export writes beside the weights, checked against transformers' own classes: the
image processor gives the pixels the run trained on (each aspect mode), the tokenizer files
read back tokenizing the same (the `legacy` flag transformers 5 does not save), and a work
dir saved before the feature-select fix still means what it trained with."""
from __future__ import annotations

import json

import numpy as np
import pytest
import transformers as tf
from PIL import Image
from skimage import data

from data_fixtures import CHAT_SPECIALS, llama_sp_tokenizer
from mmjax.batch import normalize
from mmjax.data.image import resize_uint8
from mmjax.hf import load_tokenizer, save_tokenizer
from mmjax.hf.config import image_aspect
from mmjax.hf.tokenizer_files import probe_texts
from mmjax.hf.writer import image_processor
from mmjax.models import presets

CORPUS = ["A photo of a cat.", "USER: hi ASSISTANT: it is a cup of coffee."] * 8
SIZES = [(640, 480), (480, 640), (200, 427), (336, 336), (2000, 30), (37, 101)]


@pytest.mark.parametrize("aspect", ["pad", "crop", "resize"])
def test_exported_image_processor_gives_the_runs_pixels(aspect, tmp_path):
    """Written, read back by AutoImageProcessor: the pixels mmjax trained on, to float
    rounding, for portrait, landscape, square and extreme images; and the aspect reads back."""
    cfg = presets.get("llava15_7b")
    v = cfg.vision
    image_processor(cfg, aspect).save_pretrained(tmp_path)
    assert image_aspect(tmp_path) == aspect
    proc = tf.AutoImageProcessor.from_pretrained(tmp_path)
    for size in SIZES:
        image = Image.fromarray(data.astronaut()).resize(size, Image.BICUBIC)
        theirs = proc(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = normalize(resize_uint8(image, v.image_size, v.image_mean, aspect), v.image_mean,
                         v.image_std)
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5, err_msg=str(size))


def test_a_directory_without_image_processor_is_llava15s_pad(tmp_path):
    assert image_aspect(tmp_path) == "pad"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "do_center_crop": True}))
    assert image_aspect(tmp_path) == "crop"  # llava-hf's CLIP processor: what transformers does


@pytest.mark.parametrize("legacy", [True, False])
def test_a_sentencepiece_tokenizer_reads_back_the_same(legacy, tmp_path):
    """Llama-2 / Vicuna style, legacy or not, with <image> added: saved by mmjax, the files
    tokenize every probe text (text after each special token included) as the original."""
    tok = llama_sp_tokenizer(tmp_path / "src", CORPUS, legacy=legacy, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": [*CHAT_SPECIALS, "<image>"]},
                           replace_extra_special_tokens=False)
    save_tokenizer(tok, tmp_path / "out")
    back = load_tokenizer(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["legacy"] is legacy
    for text in probe_texts(tok) + ["USER: <image>\nWhat is it?</s>USER: and?"]:
        assert back.encode(text) == tok.encode(text), text
    after = tok.convert_ids_to_tokens(tok.encode("</s>USER", add_special_tokens=False))
    assert after[1].startswith("▁") is legacy  # what legacy means: "▁" after </s>


def test_a_format_1_work_dir_keeps_every_siglip_patch(tmp_path):
    """model.json from before 'default' took transformers' meaning: a SigLIP run saved with
    'default' trained on every patch, so it reads back as 'full'; CLIP's stays 'default'."""
    from mmjax.models.config import LlavaConfig, VisionConfig
    from mmjax.training import model_spec

    tok = llama_sp_tokenizer(tmp_path / "tok", CORPUS, legacy=False, vocab_size=300)
    for family, expect in (("siglip", "full"), ("clip", "default")):
        cfg = LlavaConfig(vision=VisionConfig(family=family), vision_feature_select="default")
        work = tmp_path / family
        work.mkdir()
        model_spec.save(model_spec.ModelSpec(cfg, tok, "vicuna_v1"), work)
        assert model_spec.read(work).cfg.vision_feature_select == "default"  # format 2
        record = json.loads((work / model_spec.MODEL_FILE).read_text())
        del record["format"]
        (work / model_spec.MODEL_FILE).write_text(json.dumps(record))
        assert model_spec.read(work).cfg.vision_feature_select == expect
