"""data_pipelines: every converter on small real fixtures (real photos, public file formats,
some malformed records) -> shards the Grain pipeline reads and trains on; deterministic and
resumable output; adaptation; the dataset report."""
import io
import json
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from data_fixtures import bpe_tokenizer, write_photos
from data_pipelines import adapt, converters
from data_pipelines.convert import main as convert_main
from data_pipelines.core import BuildConfig, BuildError, Raw, build
from data_pipelines.report import iter_samples
from mmjax.data.pipeline import DataConfig, SourceConfig, build_pipeline
from mmjax.data.templates import VICUNA_SYSTEM
from mmjax.models import presets
from mmjax.sharding import LOGICAL_AXIS_RULES as RULES

CFG = presets.get("tiny")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Public-format files for a handful of real photos, each with some bad records."""
    root = tmp_path_factory.mktemp("raw")
    photos = write_photos(root / "images", size=(96, 64))  # coco/astronaut.jpg, ...
    (root / "images" / "coco" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    files = [p.split("/")[1] for p in photos]
    images = [{"id": i + 1, "file_name": f, "width": 96, "height": 64} for i, f in enumerate(files)]
    images += [{"id": 5, "file_name": "broken.jpg", "width": 96, "height": 64},
               {"id": 6, "file_name": "missing.jpg", "width": 96, "height": 64},
               {"id": 7, "file_name": "coffee.png", "width": 96, "height": 64}]  # no caption
    caps = [{"id": 100 + i, "image_id": i % 4 + 1, "caption": f"A photo, caption {i}."}
            for i in range(8)]
    caps += [{"id": 200, "image_id": 5, "caption": "broken"},
             {"id": 201, "image_id": 6, "caption": "missing"},
             {"id": 202, "caption": "no image id"}]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": caps}))
    instances = {"images": images[:4], "categories": [{"id": 1, "name": "person"},
                                                      {"id": 2, "name": "cat"}],
                 "annotations": [{"image_id": 1, "category_id": 1, "bbox": [10, 5, 40, 50]},
                                 {"image_id": 2, "category_id": 2, "bbox": [0, 0, 96, 64]}]}
    (root / "instances.json").write_text(json.dumps(instances))
    lcs = [{"id": f"lcs{i}", "image": photos[i % 4],
            "conversations": [{"from": "human", "value": "<image>\nRender a clear summary."},
                              {"from": "gpt", "value": f"caption number {i}"}]} for i in range(6)]
    lcs += [{"id": "nocv", "image": photos[0]},
            {"id": "lost", "image": "coco/missing.jpg", "conversations": lcs[0]["conversations"]},
            {"id": "escape", "image": "../captions.json", "conversations": lcs[0]["conversations"]},
            {"id": "text-only", "conversations": [{"from": "human", "value": "Hi?"},
                                                  {"from": "gpt", "value": "Hello."}]}]
    (root / "lcs.json").write_text(json.dumps(lcs))
    with tarfile.open(root / "shard-000.tar", "w") as tf:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for i, p in enumerate(photos):
            add(f"{i:05d}.jpg", (root / "images" / p).read_bytes())
            if i % 2:
                add(f"{i:05d}.json", json.dumps({"caption": f"json caption {i}"}).encode())
            else:
                add(f"{i:05d}.txt", f"text caption {i}".encode())
        add("00009.txt", b"caption without image")
        add("00010.jpg", (root / "images" / photos[0]).read_bytes())
        add("00010.json", b"{not json")
    # the released layout: v2_OpenEnded_mscoco_*_questions.json, v2_mscoco_*_annotations.json
    vq = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
          "data_subtype": "train2014", "license": {},
          "questions": [{"image_id": 1, "question": "What is she wearing?", "question_id": 11},
                        {"image_id": 1, "question": "How many people?", "question_id": 12},
                        {"image_id": 1, "question": "Is it day?", "question_id": 13},
                        {"image_id": 2, "question": "Which band?", "question_id": 21},
                        {"image_id": 2, "question": "Unanswered?", "question_id": 22},
                        {"question": "no image", "question_id": 23}]}

    def ann(qid, image_id, mca, answers, answer_type="other"):
        return {"question_id": qid, "image_id": image_id, "question_type": "what",
                "answer_type": answer_type, "multiple_choice_answer": mca,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)]}

    va = {"info": {}, "data_type": "mscoco", "data_subtype": "train2014", "license": {},
          "annotations": [
              ann(11, 1, "t-shirt", ["t-shirt", "T-Shirt", "shirt", "t-shirt", "tee"] * 2),
              ann(12, 1, "2", ["2", "two", "2", "Two.", "2"] * 2, "number"),
              ann(13, 1, "yes", ["yes"] * 10, "yes/no"),
              ann(21, 2, "the beatles", ["the beatles", "beatles", "The Beatles"] * 3
                  + ["abba"])]}
    (root / "vqa_q.json").write_text(json.dumps(vq))
    (root / "vqa_a.json").write_text(json.dumps(va))
    (root / "gqa.json").write_text(json.dumps({
        "q1": {"imageId": "astronaut", "question": "Who is this?", "answer": "astronaut",
               "fullAnswer": "This is an astronaut.", "semantic": [], "types": {}},
        "q2": {"imageId": "chelsea", "question": "What animal is it?", "answer": "cat"},
        "q3": {"imageId": "chelsea", "question": "No answer?", "answer": ""},
        "q4": {"question": "no image"}}))
    (root / "chartqa.json").write_text(json.dumps([
        {"imgname": "rocket.jpg", "query": "What is the peak?", "label": "42"},
        {"imgname": "rocket.jpg", "query": "Which year?", "label": "2019"},
        {"imgname": "coffee.png", "query": "No label"}]))
    (root / "mc.json").write_text(json.dumps([
        {"id": "m1", "image": "astronaut.jpg", "question": "What is she wearing?",
         "choices": ["a suit", "a dress", "nothing"], "answer": 0},
        {"id": "m2", "question": "Which is a mammal?", "choices": ["frog", "cat"], "answer": 1,
         "hint": "Mammals have fur."},
        {"id": "m3", "image": "chelsea.jpg", "question": "Bad index", "choices": ["a", "b"],
         "answer": 5},
        {"id": "m4", "image": "chelsea.jpg", "question": "A-OKVQA style?",
         "choices": ["yes", "no"], "correct_choice_idx": 1}]))
    corpus = ["A photo, caption", "caption number", "text caption json", "Render a clear summary",
              adapt.SHORT_ANSWER_PROMPT, adapt.MULTIPLE_CHOICE_PROMPT, "What is shown How many",
              VICUNA_SYSTEM]
    tok = root / "tokenizer"
    bpe_tokenizer(tok, corpus * 3, vocab_size=320)
    return root


def _convert(kind, raw, out, *args):
    return convert_main([kind, *[str(a) for a in args], "--out", str(out), "--no-progress",
                         "--shard-size", "3", "--image-tokens", str(CFG.image_tokens)])


def _batches(out, raw, n=2, template="vicuna_v1"):
    from mmjax.hf import load_tokenizer

    tok = load_tokenizer(raw / "tokenizer")
    cfg = DataConfig(sources=(SourceConfig("arrayrecord", str(out / "*.arrayrecord")),),
                     template=template, max_length=320, batch_size=2, workers=0,
                     max_images_per_row=1, max_bad_share=0.0)
    it = build_pipeline(cfg, tok, CFG, process_index=0, process_count=1)
    return [next(it) for _ in range(n)]


def _ids(out):
    return [r["id"] for r in iter_samples(out)]


def test_coco_captions(raw, tmp_path):
    m = _convert("coco_captions", raw, tmp_path, raw / "captions.json", "--image-root",
                 raw / "images", "--image-dir", "coco", "--all-captions")
    assert m["samples"] == 8 and m["skipped"] == {"malformed_record": 1, "no_answer": 1,
                                                  "corrupt_image": 1, "missing_image": 1}
    assert m["inputs"] == 12
    assert len(m["shards"]) == 3  # 3 + 3 + 2
    b = _batches(tmp_path, raw, template="plain")
    assert b[0]["pixel_values"].shape == (2, 1, 56, 56, 3) and (b[0]["targets"] >= 0).any()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["samples"] == 8 and report["image_width"]["p50"] == 96
    assert report["tokens_with_images"]["min"] == report["tokens_text"]["min"] + CFG.image_tokens
    assert (tmp_path / "report_lengths.png").stat().st_size > 1000
    assert "missing_image: 1" in (tmp_path / "report.md").read_text()


def test_llava_json_passthrough_lcs558k(raw, tmp_path):
    m = _convert("lcs558k", raw, tmp_path, raw / "lcs.json", "--image-root", raw / "images")
    assert m["samples"] == 7  # 6 captions + the text-only record
    assert m["skipped"] == {"malformed_record": 1, "missing_image": 1, "unsafe_image_path": 1}
    assert "text-only" in _ids(tmp_path)
    _batches(tmp_path, raw, template="plain")


def test_webdataset(raw, tmp_path):
    m = _convert("webdataset", raw, tmp_path, raw / "shard-000.tar")
    assert m["samples"] == 4 and m["skipped"] == {"missing_image": 1, "malformed_record": 1}
    recs = list(iter_samples(tmp_path))
    assert recs[1]["conversations"][1]["value"] == "json caption 1"
    assert recs[0]["images"][0] == (raw / "images" / "coco" / "astronaut.jpg").read_bytes()
    _batches(tmp_path, raw, template="plain")


def test_vqav2_adapted_and_merged(raw, tmp_path):
    m = _convert("vqav2", raw, tmp_path, raw / "vqa_q.json", raw / "vqa_a.json",
                 "--image-root", raw / "images", "--image-pattern", "coco/{image_id}.jpg",
                 "--max-turns", "2")
    # image 1.jpg .. do not exist under that pattern: use the real names instead
    assert m["skipped"].get("missing_image") == 3
    out = tmp_path / "named"
    names = {1: "astronaut", 2: "chelsea"}
    for i, n in names.items():
        (raw / "images" / "coco" / f"{i}.jpg").write_bytes(
            (raw / "images" / "coco" / f"{n}.jpg").read_bytes())
    m = _convert("vqav2", raw, out, raw / "vqa_q.json", raw / "vqa_a.json",
                 "--image-root", raw / "images", "--image-pattern", "coco/{image_id}.jpg",
                 "--max-turns", "2")
    assert m["samples"] == 3  # image 1: 3 questions -> 2 + 1 turns; image 2: 1
    assert m["skipped"] == {"no_answer": 1, "malformed_record": 1}
    recs = {r["id"]: r for r in iter_samples(out)}
    first = recs["vqav2:1:0"]["conversations"]
    assert first[0]["value"].startswith("<image>\n") and len(first) == 4
    assert all(t["value"].endswith(adapt.SHORT_ANSWER_PROMPT) for t in first[::2])
    answers = {t["value"] for r in recs.values() for t in r["conversations"][1::2]}
    # the released multiple_choice_answer as it is: no article or hyphen rewriting
    assert {"t-shirt", "2", "yes", "the beatles"} == answers
    _batches(out, raw)
    # LLaVA-1.5 has one record per image: without --max-turns nothing is split
    m = _convert("vqav2", raw, tmp_path / "whole", raw / "vqa_q.json", raw / "vqa_a.json",
                 "--image-root", raw / "images", "--image-pattern", "coco/{image_id}.jpg")
    assert m["samples"] == 2
    assert [len(r["conversations"]) for r in iter_samples(tmp_path / "whole")] == [6, 2]


def test_gqa_chartqa_multiple_choice(raw, tmp_path):
    g = _convert("gqa", raw, tmp_path / "gqa", raw / "gqa.json", "--image-root",
                 raw / "images", "--image-pattern", "coco/{image_id}.jpg")
    assert g["samples"] == 2 and g["skipped"] == {"no_answer": 1, "malformed_record": 1}
    assert [r["conversations"][1]["value"] for r in iter_samples(tmp_path / "gqa")] == [
        "astronaut", "cat"]  # GQA's `answer` as released
    c = _convert("chartqa", raw, tmp_path / "chart", raw / "chartqa.json", "--image-root",
                 raw / "images", "--image-dir", "coco")
    assert c["samples"] == 1 and c["skipped"] == {"no_answer": 1}
    conv = next(iter_samples(tmp_path / "chart"))["conversations"]
    assert len(conv) == 4  # two questions about one chart merged
    m = _convert("multiple_choice", raw, tmp_path / "mc", raw / "mc.json", "--image-root",
                 raw / "images", "--image-dir", "coco")
    assert m["samples"] == 3 and m["skipped"] == {"bad_choice": 1}
    recs = {r["id"]: r for r in iter_samples(tmp_path / "mc")}
    assert recs["multiple_choice:m1"]["conversations"][0]["value"] == (
        "<image>\nWhat is she wearing?\nA. a suit\nB. a dress\nC. nothing\n"
        + adapt.MULTIPLE_CHOICE_PROMPT)
    assert recs["multiple_choice:m1"]["conversations"][1]["value"] == "A"
    assert recs["multiple_choice:m4"]["conversations"][1]["value"] == "B"
    text_only = recs["multiple_choice:m2"]
    assert text_only["images"] == []
    assert text_only["conversations"][0]["value"].startswith("Context: Mammals have fur.\n")
    for d in ("gqa", "chart", "mc"):
        _batches(tmp_path / d, raw, n=1)


@pytest.mark.e2e
def test_output_trains(raw, tmp_path):
    """A training step on batches read from converted shards (loss finite, labels present)."""
    from test_training_step import _setup

    _convert("coco_captions", raw, tmp_path, raw / "captions.json", "--image-root",
             raw / "images", "--image-dir", "coco", "--all-captions")
    trainer, state, step, mesh = _setup()
    from mmjax.sharding import mesh_rules

    batch = _batches(tmp_path, raw, n=1, template="plain")[0]
    batch = {k: batch[k] for k in ("input_ids", "targets", "segment_ids", "positions",
                                   "pixel_values")}
    # the tiny model's vocabulary covers this tokenizer's ids
    assert batch["input_ids"].max() < CFG.llm.vocab_size
    with mesh_rules(mesh, RULES):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["label_tokens"]) > 0
    assert int(jax.device_get(state.step)) == 1


def test_deterministic_and_resumable(raw, tmp_path):
    samples = list(converters.coco_captions(raw / "captions.json", "coco", all_captions=True))
    cfg = lambda out: BuildConfig("coco", out, raw / "images", shard_size=2)  # noqa: E731
    build(iter(samples), cfg(tmp_path / "a"))

    def interrupted():
        for i, s in enumerate(samples):
            if i == 7:
                raise KeyboardInterrupt  # a Ctrl-C or kill in the middle of shard 3
            yield s

    with pytest.raises(KeyboardInterrupt):
        build(interrupted(), cfg(tmp_path / "b"))
    prog = json.loads((tmp_path / "b" / "progress.json").read_text())
    assert len(prog["shards"]) == 3 and not prog["done"]  # 7 inputs: 1 bad + 3 full shards
    build(iter(samples), cfg(tmp_path / "b"))
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert a == b
    # 8 captions of 4 images: the second caption of each repeats its image, across the resume
    assert a["duplicate_images"]["count"] == 4 and a["duplicate_images"]["mode"] == "keep"
    for shard in a["shards"]:
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    assert (tmp_path / "a" / "index.jsonl").read_text() == \
        (tmp_path / "b" / "index.jsonl").read_text()
    ids = _ids(tmp_path / "b")
    assert len(ids) == len(set(ids)) == 8
    with pytest.raises(BuildError, match="other settings"):
        build(iter(samples), BuildConfig("coco", tmp_path / "b", raw / "images", shard_size=5))


def test_reencode_and_llava_jsonl_output(raw, tmp_path):
    m = _convert("webdataset", raw, tmp_path, raw / "shard-000.tar", "--max-side", "48",
                 "--quality", "80", "--output", "llava_jsonl")
    assert m["samples"] == 4
    recs = list(iter_samples(tmp_path))
    assert all(max(wh) == 48 for r in recs for wh in r["image_wh"])
    with Image.open(tmp_path / recs[0]["image"]) as im:
        assert max(im.size) == 48 and im.format == "JPEG"
    # the JSONL output is a LLaVA source with the output dir as image root
    from mmjax.data.sources import LlavaJsonSource

    src = LlavaJsonSource(str(tmp_path / m["shards"][0]), str(tmp_path))
    assert len(src) == 3


def test_adaptation_rules():
    pairs = [(f"q{i} " + "word " * 20, "a") for i in range(5)]
    convs = adapt.merge_turns(pairs, max_turns=2)
    assert [len(c) // 2 for c in convs] == [2, 2, 1]
    assert all(c[0]["value"].startswith("<image>\n") for c in convs)
    assert all("<image>" not in t["value"] for c in convs for t in c[1:])
    by_tokens = adapt.merge_turns(pairs, max_tokens=60)
    assert all(len(c) == 4 or len(c) == 2 for c in by_tokens) and len(by_tokens) == 3
    shuffled = adapt.merge_turns(pairs, seed=3)[0]
    assert [t["value"] for t in shuffled] != [t["value"] for t in convs[0]] + \
        [t["value"] for t in convs[1]] + [t["value"] for t in convs[2]]
    assert adapt.multiple_choice("Q?", ["x", "y"], prompt="") == "Q?\nA. x\nB. y"
    with pytest.raises(ValueError):
        adapt.choice_letter(2, 2)
    assert Raw("a", []).images == []


PHOTOS = ["coco/astronaut.jpg", "coco/chelsea.jpg", "coco/coffee.png", "coco/rocket.jpg"]


def test_tfds_coco(raw, tmp_path):
    from test_data_pipeline import _tiny_coco_captions

    name = _tiny_coco_captions({"root": raw / "images", "photos": PHOTOS}, tmp_path / "tfds")
    m = _convert("tfds_coco", raw, tmp_path / "out", "--dataset", name, "--data-dir",
                 tmp_path / "tfds")
    assert m["samples"] == 4 and m["skipped"] == {"no_answer": 1}  # an image without captions
    rec = next(iter_samples(tmp_path / "out"))
    with Image.open(io.BytesIO(rec["images"][0])) as im:
        assert im.format == "PNG" and im.size == (96, 64)
    _batches(tmp_path / "out", raw, n=1, template="plain")


@pytest.mark.e2e
def test_self_instruct_output_converts_and_trains(raw, tmp_path):
    """Captions + instance boxes -> local chat server -> llava.json -> shards -> batches."""
    from test_self_instruct import Server

    from data_pipelines.self_instruct.__main__ import main as si_main

    server = Server()
    try:
        summary = si_main(["--captions", str(raw / "captions.json"), "--instances",
                           str(raw / "instances.json"), "--kinds", "conversation,detail",
                           "--base-url", server.url, "--model", "m", "--out",
                           str(tmp_path / "si"), "--no-progress", "--backoff", "0.01"])
    finally:
        server.close()
    # images 1-6 have captions (7 has none): 6 x 2 jobs, all accepted
    assert summary["jobs"] == 12 and summary["accepted"] == 12
    # the boxes reached the prompt, normalised: person [10, 5, 40, 50] on 96 x 64
    assert any("person: [0.10, 0.08, 0.52, 0.86]" in user for user, _ in server.served)
    m = _convert("llava_instruct", raw, tmp_path / "out", tmp_path / "si" / "llava.json",
                 "--image-root", raw / "images" / "coco")
    assert m["samples"] == 8 and m["skipped"] == {"corrupt_image": 2, "missing_image": 2}
    _batches(tmp_path / "out", raw)


@pytest.mark.parametrize("kind", ["lcs558k", "sharegpt4v", "llava_instruct"])
def test_repeated_ids_keep_every_record(raw, tmp_path, kind):
    """The released files repeat ids (LLaVA-Instruct's conversation / detail / reasoning
    records of one COCO image share its id; the 665K mix's VQA parts do too): every record
    is kept under a unique id, with the input's id as source_id."""
    photo = "coco/astronaut.jpg"

    def rec(i, text):
        return {"id": i, "image": photo, "conversations": [
            {"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": "Yes."}]}

    mix = [rec("000000033471", "conversation"), rec("000000033471", "detail"),
           rec("000000033471", "reasoning"), rec("vqa7", "Is it day?"),
           rec("vqa7", "Is it night?"), rec("000000033471#1", "an id that looks renamed"),
           {"id": "vqa7", "conversations": [{"from": "human", "value": "Text only?"},
                                            {"from": "gpt", "value": "Yes."}]}]
    (tmp_path / "mix.json").write_text(json.dumps(mix))
    m = _convert(kind, raw, tmp_path / "out", tmp_path / "mix.json", "--image-root",
                 raw / "images")
    assert m["samples"] == len(mix) and m["skipped"] == {}
    recs = list(iter_samples(tmp_path / "out"))
    ids = [r["id"] for r in recs]
    assert len(set(ids)) == len(mix)
    assert ids == ["000000033471", "000000033471#1", "000000033471#2", "vqa7", "vqa7#4",
                   "000000033471#1#5", "vqa7#6"]
    assert [r["source_id"] for r in recs] == [r["id"] for r in mix]
    assert [r["conversations"][0]["value"] for r in recs] == [
        r["conversations"][0]["value"] for r in mix]
    index = [json.loads(x) for x in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert [x["id"] for x in index] == ids and [x["source_id"] for x in index] == [
        r["id"] for r in mix]
