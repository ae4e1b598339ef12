"""Readers for public caption and instruction datasets, each a generator of `Raw` samples
(or `Skipped` markers) in a deterministic order. `data_pipelines.convert` writes them out.

Stage 1 (captions): LCS-558K, COCO captions (annotation JSON or a locally prepared TFDS
`coco_captions`), ShareGPT4V-style JSON, WebDataset tar shards (img2dataset: CC3M, LAION).
Stage 2 (instructions): LLaVA-Instruct-158K and llava_v1_5_mix665k (validated pass-through),
VQAv2-style questions + annotations, GQA-style, ChartQA-style, multiple choice (ScienceQA /
A-OKVQA style).
"""
from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path
from typing import Iterator

from data_pipelines import adapt, storage
from data_pipelines.core import Raw
from mmjax.data.quality import Skipped
from mmjax.data.sources import LlavaJsonSource, TfdsCaptionSource

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _load_json(path) -> object:
    path = Path(path)
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                out.append(Skipped("malformed_record", f"{path.name}:{n}", f"bad JSON: {e}"))
        return out
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------ LLaVA-form pass-through
def llava_json(path, source: str = "llava", start: int = 0,
               stop: int | None = None) -> Iterator[Raw | Skipped]:
    """Records already in LLaVA form ({id, image?, conversations}): LCS-558K,
    LLaVA-Instruct-158K, llava_v1_5_mix665k, ShareGPT4V. Text-only records (no image) pass.
    Read through the training pipeline's indexed source, one record at a time (the 665K mix
    is a 1 GB JSON array); records [start, stop) only when given (a Beam worker's part)."""
    src = LlavaJsonSource(path, name=source)
    for n in range(start, len(src) if stop is None else min(stop, len(src))):
        rec = src[n]
        if not isinstance(rec, dict):  # a Skipped marker: bad JSON or not an object
            yield rec
            continue
        conv = rec["conversations"]
        if conv is None:
            yield Skipped("malformed_record", rec["id"], "not a {id, conversations} object")
            continue
        images, video = rec["images"], rec.get("video")
        if (images or video is not None) and isinstance(conv, list) and conv \
                and isinstance(conv[0], dict) \
                and "<image>" not in "".join(str(t.get("value", "")) for t in conv):
            # some releases omit the tag for single-image records: LLaVA puts it first
            conv = [dict(conv[0], value="<image>\n" + str(conv[0].get("value", "")))] + conv[1:]
        yield Raw(rec["id"], conv, images, source, video)


lcs558k = sharegpt4v = llava_instruct = llava_json


# ----------------------------------------------------------------------------- captions
def caption_sample(sample_id: str, caption: str, image, source: str,
                   prompt: str = "<image>\n") -> Raw | Skipped:
    caption = (caption or "").strip()
    if not caption:
        return Skipped("empty_text", sample_id, "no caption")
    return Raw(sample_id, [{"from": "human", "value": prompt},
                           {"from": "gpt", "value": caption}], [image], source)


def coco_captions(annotations, image_dir: str = "", all_captions: bool = False,
                  source: str = "coco") -> Iterator[Raw | Skipped]:
    """COCO `captions_*.json`: one sample per image (its first caption), or one per caption.
    Image paths are `image_dir/file_name` under the image root."""
    data = _load_json(annotations)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{annotations}: not a COCO captions file (needs images, annotations)")
    by_image = collections.defaultdict(list)
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            yield Skipped("malformed_record", f"{source}:ann{n}", "annotation without image_id")
            continue
        by_image[ann["image_id"]].append(ann)
    for img in sorted(data["images"], key=lambda x: x.get("id", 0)):
        anns = sorted(by_image.get(img.get("id"), []), key=lambda a: a.get("id", 0))
        name = img.get("file_name")
        if not name or not anns:
            yield Skipped("no_answer" if name else "malformed_record", f"{source}:{img.get('id')}",
                      "no caption" if name else "image without file_name")
            continue
        path = f"{image_dir}/{name}" if image_dir else name
        for k, ann in enumerate(anns if all_captions else anns[:1]):
            yield caption_sample(f"{source}:{img['id']}:{k}", ann.get("caption", ""), path,
                                 source)


def tfds_coco(dataset: str = "coco_captions", split: str = "train", data_dir: str | None = None,
              source: str = "coco") -> Iterator[Raw | Skipped]:
    """A locally prepared TFDS captions dataset (never downloads); images re-encoded as PNG."""
    import numpy as np
    from PIL import Image

    src = TfdsCaptionSource.from_tfds(dataset, split, data_dir)
    for i in range(len(src)):
        ex = src[i]
        if not isinstance(ex, dict):
            yield Skipped("no_answer", ex.sample_id, ex.detail)
            continue
        buf = io.BytesIO()
        Image.fromarray(np.asarray(ex["images"][0]).astype(np.uint8)).save(buf, format="PNG")
        yield Raw(ex["id"], ex["conversations"], [buf.getvalue()], source)


def webdataset(tars, source: str = "webdataset") -> Iterator[Raw | Skipped]:
    """WebDataset tar shards as img2dataset writes them: KEY.jpg + KEY.txt (or KEY.json with
    a 'caption'). Members of one key must be adjacent (as WebDataset requires)."""
    for tar_path in sorted(str(t) for t in tars):
        try:  # a URL streams (gs://, s3://: through Beam's file systems)
            tf = tarfile.open(fileobj=storage.open_read(tar_path), mode="r|*") \
                if storage.is_url(tar_path) else tarfile.open(tar_path)
        except (tarfile.TarError, OSError) as e:
            yield Skipped("malformed_record", f"{Path(tar_path).name}", f"unreadable tar: {e}")
            continue
        with tf:
            group_key, group = None, {}
            try:
                for member in tf:
                    if not member.isfile():
                        continue
                    base = Path(member.name).name
                    key, _, ext = base.partition(".")
                    key = str(Path(member.name).parent / key)
                    if key != group_key and group_key is not None:
                        yield _wds_sample(group_key, group, tar_path, source)
                        group = {}
                    group_key = key
                    group["." + ext.lower()] = tf.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError) as e:
                yield Skipped("malformed_record", f"{Path(tar_path).name}", f"truncated tar: {e}")
            if group_key is not None and group:
                yield _wds_sample(group_key, group, tar_path, source)


def parquet(files, source: str = "parquet", image_column: str = "jpg",
            url_column: str = "url", caption_column: str = "caption",
            key_column: str = "key") -> Iterator[Raw | Skipped]:
    """Parquet tables of image-text pairs, as img2dataset writes them with
    output_format=parquet (the image bytes in `jpg`, with `key`, `caption`, `status`) or as
    URL lists come (`url`, `caption`: the image is fetched at build time with --fetch-urls).
    A row img2dataset could not download (status other than success) is a missing image."""
    import pyarrow as pa  # the beam extra brings pyarrow (pip install 'mmjax[beam]')
    import pyarrow.parquet as pq

    for path in sorted(str(f) for f in files):
        name = Path(path).stem
        try:
            table = pq.ParquetFile(storage.open_read(path) if storage.is_url(path) else path)
            have = set(table.schema_arrow.names)
            batches = table.iter_batches(batch_size=512, columns=[
                c for c in (key_column, image_column, url_column, caption_column, "status",
                            "error_message") if c in have])
            n = 0
            for batch in batches:
                for row in batch.to_pylist():
                    yield _parquet_sample(row, f"{source}:{name}/{row.get(key_column) or n}",
                                          image_column, url_column, caption_column, source)
                    n += 1
        except (OSError, pa.ArrowException) as e:
            yield Skipped("malformed_record", f"{source}:{name}", f"unreadable parquet: {e}")


def _parquet_sample(row, sample_id, image_column, url_column, caption_column, source):
    status = row.get("status")
    if status not in (None, "success"):
        return Skipped("missing_image", sample_id,
                       f"img2dataset: {status} ({row.get('error_message') or ''})")
    image = row.get(image_column) or row.get(url_column)
    if not image:
        return Skipped("missing_image", sample_id, f"no {image_column} bytes or {url_column}")
    return caption_sample(sample_id, row.get(caption_column) or "", image, source)


def _wds_sample(key, group, tar_path, source) -> Raw | Skipped:
    sample_id = f"{source}:{Path(tar_path).stem}/{key}"
    image = next((group[e] for e in IMAGE_EXTS if e in group), None)
    if image is None:
        return Skipped("missing_image", sample_id, f"no image among {sorted(group)}")
    caption = None
    if ".txt" in group:
        caption = group[".txt"].decode("utf-8", "replace")
    elif ".json" in group:
        try:
            caption = json.loads(group[".json"]).get("caption")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
            return Skipped("malformed_record", sample_id, f"bad json: {e}")
    return caption_sample(sample_id, caption or "", image, source)


# -------------------------------------------------------------------- short-answer VQA
def vqav2(questions, annotations, image_pattern: str = "COCO_train2014_{image_id:012d}.jpg",
          prompt: str = adapt.SHORT_ANSWER_PROMPT, max_turns: int = 0, max_tokens: int = 0,
          seed: int = 0, source: str = "vqav2") -> Iterator[Raw | Skipped]:
    """VQAv2 question + annotation files; the answer is the released `multiple_choice_answer`
    as it is (the evaluation's normalisation is for scoring predictions, not for targets).
    Questions about one image are merged into one multi-turn conversation, as in LLaVA-1.5's
    mix (caps: max_turns, max_tokens; 0 = none)."""
    qs = _load_json(questions)
    anns = _load_json(annotations)
    answers = {}
    for a in anns.get("annotations", []) if isinstance(anns, dict) else []:
        if isinstance(a, dict) and "question_id" in a:
            answers[a["question_id"]] = a
    per_image = collections.defaultdict(list)
    for n, q in enumerate(qs.get("questions", []) if isinstance(qs, dict) else []):
        if not isinstance(q, dict) or not {"image_id", "question", "question_id"} <= set(q):
            yield Skipped("malformed_record", f"{source}:q{n}",
                          "question without image_id/question")
            continue
        ann = answers.get(q["question_id"]) or {}
        answer = ann.get("multiple_choice_answer")
        if not isinstance(answer, str) or not answer.strip():
            yield Skipped("no_answer", f"{source}:{q['question_id']}", "no annotated answer")
            continue
        per_image[q["image_id"]].append((adapt.short_answer(q["question"], prompt), answer))
    yield from _merged(per_image, lambda i: image_pattern.format(image_id=i), max_turns,
                       max_tokens, seed, source)


def gqa(questions, image_pattern: str = "{image_id}.jpg", prompt: str = adapt.SHORT_ANSWER_PROMPT,
        max_turns: int = 0, max_tokens: int = 0, seed: int = 0,
        source: str = "gqa") -> Iterator[Raw | Skipped]:
    """GQA questions ({question_id: {imageId, question, answer}}), the released answer as it
    is, merged per image."""
    data = _load_json(questions)
    items = data.items() if isinstance(data, dict) else enumerate(data)
    per_image = collections.defaultdict(list)
    for qid, q in sorted(items, key=lambda kv: str(kv[0])):
        if not isinstance(q, dict) or not q.get("imageId") or not q.get("question"):
            yield Skipped("malformed_record", f"{source}:{qid}", "needs imageId and question")
            continue
        answer = q.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            yield Skipped("no_answer", f"{source}:{qid}", "no answer")
            continue
        per_image[q["imageId"]].append((adapt.short_answer(q["question"], prompt), answer))
    yield from _merged(per_image, lambda i: image_pattern.format(image_id=i), max_turns,
                       max_tokens, seed, source)


def chartqa(path, image_dir: str = "png", prompt: str = adapt.SHORT_ANSWER_PROMPT,
            max_turns: int = 0, max_tokens: int = 0, seed: int = 0,
            source: str = "chartqa") -> Iterator[Raw | Skipped]:
    """ChartQA-style JSON: [{imgname, query, label}], merged per chart."""
    per_image = collections.defaultdict(list)
    for n, q in enumerate(_load_json(path)):
        if isinstance(q, Skipped):
            yield q
            continue
        if not isinstance(q, dict) or not q.get("imgname") or not q.get("query"):
            yield Skipped("malformed_record", f"{source}:{n}", "needs imgname and query")
            continue
        label = str(q.get("label", "")).strip()
        if not label:
            yield Skipped("no_answer", f"{source}:{n}", "no label")
            continue
        per_image[q["imgname"]].append((adapt.short_answer(q["query"], prompt), label))
    yield from _merged(per_image, lambda i: f"{image_dir}/{i}" if image_dir else i, max_turns,
                       max_tokens, seed, source)


def _merged(per_image, image_path, max_turns, max_tokens, seed, source):
    for image_id in sorted(per_image, key=str):
        convs = adapt.merge_turns(per_image[image_id], max_turns, max_tokens,
                                  seed=adapt.stable_seed(seed, image_id))
        for k, conv in enumerate(convs):
            yield Raw(f"{source}:{image_id}:{k}", conv, [image_path(image_id)], source)


# ------------------------------------------------------------------------ multiple choice
def multiple_choice(path, image_dir: str = "", prompt: str = adapt.MULTIPLE_CHOICE_PROMPT,
                    source: str = "mc") -> Iterator[Raw | Skipped]:
    """ScienceQA / A-OKVQA style: {id, image?, question, choices, answer | correct_choice_idx,
    hint?}. Text-only questions (no image) are kept without an image, as LLaVA does."""
    for n, q in enumerate(_load_json(path)):
        if isinstance(q, Skipped):
            yield q
            continue
        sample_id = f"{source}:{q.get('id', q.get('question_id', n))}" if isinstance(q, dict) \
            else f"{source}:{n}"
        if not isinstance(q, dict) or not q.get("question") or not isinstance(
                q.get("choices"), list):
            yield Skipped("malformed_record", sample_id, "needs question and a choices list")
            continue
        idx = q.get("answer", q.get("correct_choice_idx"))
        try:
            letter = adapt.choice_letter(int(idx), len(q["choices"]))
            text = adapt.multiple_choice(q["question"], q["choices"], prompt)
        except (TypeError, ValueError) as e:
            yield Skipped("bad_choice", sample_id, str(e))
            continue
        hint = str(q.get("hint") or "").strip()
        if hint:
            text = f"Context: {hint}\n{text}"
        image = q.get("image")
        images = [f"{image_dir}/{image}" if image_dir else image] if image else []
        value = f"<image>\n{text}" if images else text
        yield Raw(sample_id, [{"from": "human", "value": value}, {"from": "gpt", "value": letter}],
                  images, source)
