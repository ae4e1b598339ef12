"""The Grain pipeline end to end on real files: every source kind, bad input accounting,
packing, resumption through Orbax, per-process sharding and global batches."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jitted import forward, init

from data_fixtures import (
    CORPUS,
    bad_records,
    conv,
    good_records,
    word_tokenizer,
    write_llava_json,
    write_photos,
)
from mmjax import batch as batch_format
from mmjax.data import records
from mmjax.data.batching import pack
from mmjax.data.pipeline import DataConfig, SourceConfig, build_pipeline, skip_report
from mmjax.data.quality import BadShareExceeded
from mmjax.data.sources import (
    ArrayRecordSource,
    DataSourceError,
    LlavaJsonSource,
    TfdsCaptionSource,
)
from mmjax.models import Llava, presets
from mmjax.sharding import LOGICAL_AXIS_RULES as RULES
from mmjax.sharding import make_mesh

MODEL = presets.get("tiny")  # 56 px images, 16 image tokens


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    root = base / "images"
    photos = write_photos(root)
    good = good_records(photos)
    bad = bad_records(root, photos)
    tok = word_tokenizer(base / "tok", CORPUS)
    return dict(root=root, photos=photos, good=good, bad=bad, tok=tok, base=base,
                json=write_llava_json(base / "good.json", good),
                jsonl=write_llava_json(base / "mixed.jsonl", good + bad, jsonl=True,
                                       malformed_line=True))


def _cfg(path, root, **kw):
    kw.setdefault("max_length", 128)
    kw.setdefault("batch_size", 2)
    kw.setdefault("shuffle", False)
    return DataConfig(sources=(SourceConfig("llava_json", str(path), str(root)),), **kw)


def _drain(it):
    return [b for b in it]


def _ids(batches):
    return [i for b in batches for row in b["ids"] for i in row]


def _padding(batch: dict) -> float:
    """Share of a batch's token slots that hold padding."""
    return float(np.mean(batch["segment_ids"] == 0))


def test_json_and_jsonl_give_the_same_records(files, tmp_path, monkeypatch):
    a = LlavaJsonSource(files["json"], files["root"], cache_dir=str(tmp_path))
    lines = write_llava_json(tmp_path / "good.jsonl", files["good"], jsonl=True)
    b = LlavaJsonSource(lines, files["root"], cache_dir=str(tmp_path))
    assert len(a) == len(b) == 4
    for i in range(4):
        assert a[i]["id"] == b[i]["id"] and a[i]["conversations"] == b[i]["conversations"]
    assert a[2]["images"] == files["photos"][2:4]  # a list of paths
    assert a[3]["images"] == []  # text only
    assert len(list(tmp_path.glob("*.index.npy"))) == 2  # indexed once, cached
    # without a cache dir the index goes to $MMJAX_CACHE_DIR (or ~/.cache/mmjax), never
    # beside the data
    monkeypatch.setenv("MMJAX_CACHE_DIR", str(tmp_path / "cache"))
    before = set(Path(files["json"]).parent.iterdir())
    assert len(LlavaJsonSource(files["json"], files["root"])) == 4
    assert set(Path(files["json"]).parent.iterdir()) == before
    assert len(list((tmp_path / "cache" / "index").glob("*.index.npy"))) == 1


def test_json_index_handles_unicode_and_large_files(tmp_path):
    recs = [{"id": f"r{i}", "conversations": conv(f"Q {i} — café ✓?", "Ünïcödé " * (i % 7))}
            for i in range(3000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(recs, ensure_ascii=False))
    src = LlavaJsonSource(path, tmp_path)
    assert len(src) == 3000
    assert src[2999]["conversations"] == recs[2999]["conversations"]
    assert src[1234]["id"] == "r1234"


def test_malformed_json_array_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "a", "conversations": []}, {"id": "b", ')
    with pytest.raises(DataSourceError, match="broken.json"):
        LlavaJsonSource(path, tmp_path)
    with pytest.raises(DataSourceError, match="does not exist"):
        LlavaJsonSource(tmp_path / "none.json", tmp_path)


def test_stage2_batches_have_model_shapes_and_run(files):
    it = build_pipeline(_cfg(files["json"], files["root"], max_images_per_row=2), files["tok"],
                        MODEL)
    batches = _drain(it)
    assert _ids(batches) == ["single", "multi_turn", "two_images", "text_only"]
    b = batches[0]
    assert b["input_ids"].shape == b["targets"].shape == (2, 128)
    assert b["pixel_values"].shape == (2, 2, 56, 56, 3) and b["pixel_values"].dtype == np.uint8
    # image tokens equal to the images' patch count, and the model runs on the batch
    n_img = (b["input_ids"] == MODEL.image_token_id).sum(1)
    assert set(n_img.tolist()) <= {0, MODEL.image_tokens}
    from mmjax.batch import normalize

    v = MODEL.vision
    pixels = normalize(jnp.asarray(b["pixel_values"]), v.image_mean, v.image_std)
    params = init(Llava(MODEL), jax.random.key(0), jnp.asarray(b["input_ids"]), pixels)
    logits = forward(Llava(MODEL), params, jnp.asarray(b["input_ids"]), pixels,
                                jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"])).logits
    assert logits.shape == (2, 128, MODEL.llm.vocab_size)


def test_two_image_sample_needs_two_slots(files):
    cfg = _cfg(files["json"], files["root"], max_images_per_row=2)
    batches = _drain(build_pipeline(cfg, files["tok"], MODEL))
    assert "two_images" in _ids(batches)
    one_slot = build_pipeline(_cfg(files["json"], files["root"], max_bad_share=1.0),
                              files["tok"], MODEL)
    _drain(one_slot)
    assert skip_report(one_slot).counts == {"too_long": 1}


def test_stage1_plain_template(files, tmp_path):
    caps = [{"id": f"c{i}", "image": p, "conversations": conv("<image>\n", "An astronaut.")}
            for i, p in enumerate(files["photos"])]
    path = write_llava_json(tmp_path / "caps.json", caps)
    batches = _drain(build_pipeline(_cfg(path, files["root"], template="plain", max_length=32),
                                    files["tok"], MODEL))
    b = batches[0]
    row = b["input_ids"][0][b["segment_ids"][0] > 0]
    assert (row[:16] == MODEL.image_token_id).all() and len(row) == 16 + 3
    learned = b["targets"][0][b["targets"][0] != -100]
    assert files["tok"].convert_ids_to_tokens(learned.tolist()) == ["An", "astronaut", "."]


EXPECTED_BAD = {"missing_image": 1, "corrupt_image": 2, "empty_image": 1, "image_too_large": 1,
                "unsafe_image_path": 3, "malformed_record": 1, "unknown_role": 1,
                "turns_not_alternating": 1, "image_count_mismatch": 1, "empty_reply": 1,
                "too_long": 1}


def test_every_bad_kind_is_skipped_counted_and_reported(files, caplog):
    it = build_pipeline(_cfg(files["jsonl"], files["root"], max_bad_share=1.0,
                             max_images_per_row=2), files["tok"], MODEL)
    batches = _drain(it)
    assert sorted(_ids(batches)) == ["multi_turn", "single", "text_only", "two_images"]
    report = skip_report(it)
    assert report.counts == EXPECTED_BAD
    assert report.seen == 4 + sum(EXPECTED_BAD.values())
    assert report.metrics()["data/skipped/unsafe_image_path"] == 3.0
    assert "14 skipped" in report.summary()
    assert "bad_symlink" in caplog.text and "unsafe_image_path" in caplog.text


def test_bad_share_above_the_limit_aborts(files):
    it = build_pipeline(_cfg(files["jsonl"], files["root"], max_bad_share=0.25,
                             min_samples_before_abort=5), files["tok"], MODEL)
    with pytest.raises(BadShareExceeded, match="more than the allowed 25.0%"):
        _drain(it)


def test_tokenization_mismatch_counts_and_aborts(files, tmp_path):
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.train_from_iterator(["USER: Hi ASSISTANT: Yes</s>"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>", "<image>", "<pad>"],
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>",
                                  pad_token="<pad>")
    recs = [{"id": f"m{i}", "conversations": conv("Hi", "Yes")} for i in range(10)]
    path = write_llava_json(tmp_path / "m.json", recs)
    it = build_pipeline(_cfg(path, tmp_path, min_samples_before_abort=1), tok, MODEL)
    with pytest.raises(BadShareExceeded, match="tokenization_mismatch"):
        _drain(it)


def test_packing_segments_positions_and_boundaries(files, tmp_path):
    recs = [dict(r, id=f"{r['id']}_{k}") for k in range(6) for r in files["good"][:2] +
            files["good"][3:]]
    path = write_llava_json(tmp_path / "many.json", recs)
    padded = _drain(build_pipeline(_cfg(path, files["root"], max_length=64, seq_len=128),
                                   files["tok"], MODEL))
    for mode in ("first_fit", "best_fit"):
        cfg = _cfg(path, files["root"], max_length=64, seq_len=128, packing=mode,
                   max_images_per_row=4)
        batches = _drain(build_pipeline(cfg, files["tok"], MODEL))
        assert sorted(_ids(batches)) == sorted(r["id"] for r in recs)
        for b in batches:
            for r in range(b["input_ids"].shape[0]):
                seg, pos, tgt = b["segment_ids"][r], b["positions"][r], b["targets"][r]
                n = len(b["ids"][r])
                assert set(seg[seg > 0].tolist()) == set(range(1, n + 1))
                for s in range(1, n + 1):
                    where = np.flatnonzero(seg == s)
                    assert (np.diff(where) == 1).all()  # contiguous
                    assert (pos[where] == np.arange(len(where))).all()
                    assert tgt[where[-1]] == -100  # last token of a sample predicts nothing
                assert (tgt[seg == 0] == -100).all()
                # images in the row = image tokens / tokens per image
                n_img = int((b["input_ids"][r] == MODEL.image_token_id).sum()) // 16
                assert all(b["pixel_values"][r, k].max() > 0 for k in range(n_img))
                assert (b["pixel_values"][r, n_img:] == 0).all()
        pad_share = np.mean([_padding(b) for b in padded])
        pack_share = np.mean([_padding(b) for b in batches])
        assert pack_share < pad_share


def test_pack_first_fit_and_best_fit():
    lengths, images = [6, 5, 4, 3, 2], [1, 1, 0, 0, 0]
    assert pack(lengths, images, 10, 4, "first_fit") == [[0, 2], [1, 3, 4]]
    assert pack(lengths, images, 10, 4, "best_fit") == [[0, 2], [1, 3, 4]]
    assert pack([5, 5, 5], [1, 1, 1], 20, 2, "first_fit") == [[0, 1], [2]]  # image slots


def test_group_by_length_batches_similar_lengths(files, tmp_path):
    recs = [{"id": f"g{i}", "conversations": conv("What is two plus two?" + " Hi" * (i % 9),
                                                  "Four.")} for i in range(32)]
    path = write_llava_json(tmp_path / "g.json", recs)
    cfg = _cfg(path, files["root"], batch_size=4, group_by_length=True, pack_window=32)
    batches = _drain(build_pipeline(cfg, files["tok"], MODEL))
    spread = [np.ptp((b["segment_ids"] > 0).sum(1)) for b in batches]
    assert max(spread) <= 2 and sorted(_ids(batches)) == sorted(r["id"] for r in recs)
    # with length buckets, short batches get short rows (few static shapes for XLA)
    bucketed = _drain(build_pipeline(_cfg(path, files["root"], batch_size=4,
                                          group_by_length=True, pack_window=32,
                                          length_buckets=(64, 96)), files["tok"], MODEL))
    assert {b["input_ids"].shape[1] for b in bucketed} <= {64, 96, 128}
    assert np.mean([_padding(b) for b in bucketed]) < np.mean(
        [_padding(b) for b in batches])


def test_arrayrecord_source_feeds_the_pipeline(files, tmp_path):
    encoded = [records.encode(r["id"], r["conversations"],
                              [(files["root"] / p).read_bytes() for p in
                               ([r["image"]] if isinstance(r.get("image"), str)
                                else r.get("image", []))])
               for r in files["good"]]
    encoded.append(b"garbage that is not a record")
    records.write_shard(tmp_path / "train-00000.arrayrecord", encoded[:3])
    records.write_shard(tmp_path / "train-00001.arrayrecord", encoded[3:])
    src = ArrayRecordSource(str(tmp_path / "train-*.arrayrecord"))
    assert len(src) == 5
    cfg = DataConfig(sources=(SourceConfig("arrayrecord", str(tmp_path / "train-*")),),
                     max_length=128, batch_size=2, shuffle=False, max_images_per_row=2,
                     max_bad_share=1.0)
    it = build_pipeline(cfg, files["tok"], MODEL, sources=[src])
    assert sorted(_ids(_drain(it))) == ["multi_turn", "single", "text_only", "two_images"]
    assert skip_report(it).counts == {"malformed_record": 1}


_TFDS_BUILDERS: dict = {}


def _tiny_coco_captions(files, data_dir):
    """A real TFDS dataset with `coco_captions`' element form, built and prepared locally
    (array_record files; the real coco_captions needs a download to prepare). The builder
    class is registered once per session (TFDS refuses a second class of the same name)."""
    import tensorflow_datasets as tfds
    from PIL import Image

    photos = [np.asarray(Image.open(files["root"] / p).convert("RGB")) for p in files["photos"]]
    if "cls" not in _TFDS_BUILDERS:
        class TinyCocoCaptions(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            photos: list = []

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                                  encoding="zlib"),
                    "image/id": np.int64,
                    "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i, im in enumerate(self.photos):
                    yield i, {"image": im, "image/id": 100 + i,
                              "captions": {"text": ["An astronaut.", "A cat."]}}
                yield 99, {"image": self.photos[0], "image/id": 9, "captions": {"text": []}}

        _TFDS_BUILDERS["cls"] = TinyCocoCaptions
    cls = _TFDS_BUILDERS["cls"]
    cls.photos = photos
    cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "tiny_coco_captions"


def test_tfds_source_feeds_the_pipeline(files, tmp_path):
    name = _tiny_coco_captions(files, tmp_path)
    src = TfdsCaptionSource.from_tfds(name, "train", str(tmp_path))
    assert len(src) == 5
    by_id = {src[i]["id"]: src[i] for i in range(5) if isinstance(src[i], dict)}
    assert by_id["tiny_coco_captions:100"]["conversations"][1]["value"] in ("An astronaut.",
                                                                             "A cat.")
    cfg = DataConfig(sources=(SourceConfig("tfds", name, split="train"),), template="plain",
                     max_length=32, batch_size=2, shuffle=False, max_bad_share=1.0,
                     tfds_data_dir=str(tmp_path))
    it = build_pipeline(cfg, files["tok"], MODEL)
    batches = _drain(it)
    assert sorted(_ids(batches)) == [f"tiny_coco_captions:{100 + i}" for i in range(4)]
    assert batches[0]["pixel_values"].shape == (2, 1, 56, 56, 3)
    assert skip_report(it).counts == {"empty_reply": 1}


def test_weighted_mixture_is_deterministic(files, tmp_path):
    a = write_llava_json(tmp_path / "a.json", [dict(r, id=f"a{i}") for i, r in
                                               enumerate(files["good"][3:] * 40)])
    b = write_llava_json(tmp_path / "b.json", [dict(r, id=f"b{i}") for i, r in
                                               enumerate(files["good"][3:] * 40)])
    cfg = DataConfig(sources=(SourceConfig("llava_json", str(a), str(files["root"]), 3.0),
                              SourceConfig("llava_json", str(b), str(files["root"]), 1.0)),
                     max_length=64, batch_size=4, seed=7, num_epochs=None)
    run = [_ids([next(it) for _ in range(10)])
           for it in (build_pipeline(cfg, files["tok"], MODEL) for _ in range(2))]
    assert run[0] == run[1]
    share_a = np.mean([i.startswith("a") for i in run[0]])
    assert 0.6 < share_a < 0.9  # 3:1 weights


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_through_orbax_sees_the_same_samples(files, tmp_path, workers):
    import grain
    import orbax.checkpoint as ocp

    recs = [dict(r, id=f"{r['id']}_{k}") for k in range(8) for r in files["good"][:2] +
            files["good"][3:]]
    path = write_llava_json(tmp_path / "r.json", recs)
    cfg = _cfg(path, files["root"], shuffle=True, seed=3, num_epochs=2, packing="first_fit",
               max_length=64, max_images_per_row=4, pack_window=6, workers=workers)
    full = _ids(_drain(build_pipeline(cfg, files["tok"], MODEL)))

    it = build_pipeline(cfg, files["tok"], MODEL)
    first = _ids([next(it) for _ in range(3)])
    mgr = ocp.CheckpointManager(tmp_path / "ckpt")
    mgr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    del it

    resumed = build_pipeline(cfg, files["tok"], MODEL)
    mgr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed)))
    rest = _ids(_drain(resumed))
    assert first + rest == full
    assert len(full) == 2 * len(recs)


def test_processes_read_disjoint_shares(files, tmp_path):
    recs = [dict(files["good"][3], id=f"t{i}") for i in range(16)]
    path = write_llava_json(tmp_path / "t.json", recs)
    cfg = _cfg(path, files["root"], max_length=64, shuffle=True)
    shares = [_ids(_drain(build_pipeline(cfg, files["tok"], MODEL, process_index=p,
                                         process_count=2))) for p in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(r["id"] for r in recs)


def test_global_batch_on_the_mesh(files):
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    cfg = _cfg(files["json"], files["root"], batch_size=8, num_epochs=None)
    batch = next(build_pipeline(cfg, files["tok"], MODEL))
    arrays = batch_format.global_batch(batch, mesh, RULES)
    assert arrays["input_ids"].shape == (8, 128)
    assert arrays["pixel_values"].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(arrays["targets"]), batch["targets"])
    # the pipeline's batches are the format mmjax.batch declares, and the step's shapes
    abstract = batch_format.abstract(8, 128, cfg.image_slots(MODEL.image_tokens),
                                     MODEL.vision.image_size)
    for key, (axes, dtype) in batch_format.FIELDS.items():
        assert batch[key].dtype == dtype and batch[key].ndim == len(axes), key
        assert arrays[key].shape == abstract[key].shape, key


def _llava_expand2square(pil_img, background_color):
    """Port of `expand2square` from haotian-liu/LLaVA llava/mm_utils.py (LLaVA-1.5 `pad`)."""
    from PIL import Image

    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (500, 333), (200, 100), (336, 336),
                                  (1000, 999), (2000, 30)])
def test_pad_resize_equals_llava_and_the_clip_processor(size):
    # LLaVA-1.5: expand2square with the mean colour, then CLIPImageProcessor (PIL bicubic
    # shortest edge 336, centre crop, rescale, normalise). mmjax's resize skips the padded
    # rows in PIL's horizontal pass; the pixels must still be the same uint8 values.
    from PIL import Image
    from skimage import data
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from mmjax.batch import normalize
    from mmjax.data.image import resize_uint8

    v = presets.get("llava15_7b").vision
    proc = CLIPImageProcessorPil(size={"shortest_edge": v.image_size},
                                 crop_size={"height": v.image_size, "width": v.image_size},
                                 image_mean=list(v.image_mean), image_std=list(v.image_std))
    image = Image.fromarray(data.astronaut()).resize(size, Image.BICUBIC)
    padded = _llava_expand2square(image, tuple(int(x * 255) for x in v.image_mean))
    ref = proc(padded, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = normalize(resize_uint8(image, v.image_size, v.image_mean, "pad"), v.image_mean,
                     v.image_std)
    step = 1 / (255 * max(v.image_std))  # one uint8 level, normalised
    np.testing.assert_allclose(ours, ref, rtol=0, atol=step / 100)
