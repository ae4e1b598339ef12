"""Tiny benchmark folders in the layouts the benchmarks are released in, with real photos.

Each writer returns the folder to pass as --data. `broken=True` adds one record whose image
is missing and one malformed record (a required field missing or of the wrong type)."""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo(i: int, fmt: str = "JPEG") -> bytes:
    from skimage import data

    arr = getattr(data, PHOTOS[i % len(PHOTOS)])()
    buf = io.BytesIO()
    Image.fromarray(arr).resize((40, 32)).save(buf, fmt)
    return buf.getvalue()


def _img(path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(photo(i, "PNG" if path.suffix == ".png" else "JPEG"))


def _dump(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


TEN = ["2", "two", "2", "2", "3", "2", "two.", "2", "3", "3"]


def vqav2(root: Path, broken: bool = False) -> Path:
    qs, anns = [], []
    rows = [(1, 1, "How many cats?", TEN, "number"),
            (2, 2, "Is it red?", ["yes"] * 10, "yes/no"),
            (3, 3, "What animal?", ["dog"] * 4 + ["a dog"] * 3 + ["cat"] * 3, "other")]
    if broken:
        rows.append((4, 99, "Missing image?", ["yes"] * 10, "yes/no"))
    for qid, image_id, q, answers, atype in rows:
        qs.append({"image_id": image_id, "question": q, "question_id": qid})
        anns.append({"question_id": qid, "image_id": image_id, "answer_type": atype,
                     "question_type": "x", "multiple_choice_answer": answers[0],
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                 for k, a in enumerate(answers)]})
        if image_id != 99:
            _img(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", image_id)
    if broken:
        qs.append({"image_id": 1, "question_id": 5})  # no question
        anns.append({**anns[0], "question_id": 5})
    _dump(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": qs})
    _dump(root / "v2_mscoco_val2014_annotations.json", {"annotations": anns})
    # test-dev: questions only
    _dump(root / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
          {"questions": [{"image_id": 7, "question": "What is it?", "question_id": 70}]})
    _dump(root / "v2_OpenEnded_mscoco_test2015_questions.json",
          {"questions": [{"image_id": 7, "question": "What is it?", "question_id": 70},
                         {"image_id": 8, "question": "Where?", "question_id": 80}]})
    _img(root / "test2015" / f"COCO_test2015_{7:012d}.jpg", 0)
    return root


def gqa(root: Path, broken: bool = False) -> Path:
    qs = {"q1": {"imageId": "n1", "question": "What color is the cat?", "answer": "gray",
                 "fullAnswer": "The cat is gray.",
                 "types": {"structural": "query", "semantic": "attr", "detailed": "c"}},
          "q2": {"imageId": "n2", "question": "Is there a cup?", "answer": "yes",
                 "fullAnswer": "Yes, there is a cup.",
                 "types": {"structural": "verify", "semantic": "obj", "detailed": "e"}},
          "q3": {"imageId": "n3", "question": "Which side is the rocket on?",
                 "answer": "left", "fullAnswer": "The rocket is on the left.",
                 "types": {"structural": "query", "semantic": "rel", "detailed": "r"}}}
    if broken:
        qs["q4"] = {"imageId": "n404", "question": "Where?", "answer": "here"}
        qs["q5"] = {"imageId": "n1", "question": 17, "answer": "x"}
    _dump(root / "testdev_balanced_questions.json", qs)
    for i in (1, 2, 3):
        _img(root / "images" / f"n{i}.jpg", i)
    return root


def textvqa(root: Path, broken: bool = False, ocr_in_questions: bool = False) -> Path:
    data = [{"question_id": 10, "question": "what brand is this?", "image_id": "t1",
             "answers": ["sony"] * 6 + ["Sony."] * 2 + ["sonny", "canon"]},
            {"question_id": 11, "question": "what number is shown?", "image_id": "t2",
             "answers": ["2"] * 2 + ["two"] * 1 + ["3"] * 7}]
    if broken:
        data.append({"question_id": 12, "question": "what?", "image_id": "t404",
                     "answers": ["a"] * 10})
        data.append({"question_id": 13, "image_id": "t1", "answers": ["a"] * 10})
    ocr = {"t1": ["SONY", "alpha"], "t2": []}
    if ocr_in_questions:
        for d in data:
            d["ocr_tokens"] = ocr.get(d["image_id"], [])
    else:
        _dump(root / "TextVQA_Rosetta_OCR_v0.2_val.json",
              {"data": [{"image_id": k, "ocr_tokens": v} for k, v in ocr.items()]})
    _dump(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": data})
    for i in (1, 2):
        _img(root / "train_images" / f"t{i}.jpg", i)
    return root


def pope(root: Path, broken: bool = False) -> Path:
    for cat in ("adversarial", "popular", "random"):
        lines = []
        for k, (obj, label) in enumerate([("cat", "yes"), ("dog", "no"), ("cup", "yes"),
                                          ("car", "no")]):
            lines.append(json.dumps({"question_id": k + 1, "image": f"COCO_val2014_{k}.jpg",
                                     "text": f"Is there a {obj} in the image?",
                                     "label": label}))
        if broken and cat == "random":
            lines.append(json.dumps({"question_id": 9, "image": "COCO_val2014_404.jpg",
                                     "text": "Is there a bus in the image?", "label": "no"}))
            lines.append(json.dumps({"question_id": 10, "image": "COCO_val2014_0.jpg",
                                     "text": "Is there a bus in the image?",
                                     "label": "maybe"}))
            lines.append('{"question_id": 11, "image": ')
        (root / f"coco_pope_{cat}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"coco_pope_{cat}.json").write_text("\n".join(lines) + "\n")
    for k in range(4):
        _img(root / "val2014" / f"COCO_val2014_{k}.jpg", k)
    return root


def scienceqa(root: Path, broken: bool = False) -> Path:
    problems = {
        "1": {"question": "Which animal is shown?", "choices": ["cat", "dog"], "answer": 0,
              "hint": "", "image": "image.png", "split": "test"},
        "2": {"question": "Which is a liquid?", "choices": ["rock", "water", "wood"],
              "answer": 1, "hint": "Think about it.", "image": None, "split": "test"},
        "3": {"question": "What is in the sky?", "choices": ["a rocket", "a fish", "a tree",
                                                             "a rock"],
              "answer": 0, "hint": "Look at the picture.", "image": "image.png",
              "split": "test"},
        "4": {"question": "Which one?", "choices": ["x", "y"], "answer": 1, "hint": "",
              "image": "image.png", "split": "test"},
    }
    ids = ["1", "2", "3", "4"]
    if broken:
        problems["5"] = {"question": "Missing?", "choices": ["a", "b"], "answer": 0,
                         "hint": "", "image": "image.png", "split": "test"}
        problems["6"] = {"question": "Bad?", "choices": "ab", "answer": 0, "hint": "",
                         "image": "image.png", "split": "test"}
        ids += ["5", "6"]
        _img(root / "test" / "6" / "image.png", 0)
    _dump(root / "problems.json", problems)
    _dump(root / "pid_splits.json", {"test": ids, "val": [], "train": [], "minival": []})
    for pid in ("1", "3", "4"):
        _img(root / "test" / pid / "image.png", int(pid))
    return root


def mme(root: Path, broken: bool = False) -> Path:
    # a flat subtask (image beside its .txt) and a nested one (images/ + questions_answers_YN/)
    (root / "existence").mkdir(parents=True, exist_ok=True)
    for k, (a, b) in enumerate([("Yes", "No"), ("No", "Yes")]):
        _img(root / "existence" / f"{k}.jpg", k)
        (root / "existence" / f"{k}.txt").write_text(
            f"Is there a cat in this image? Please answer yes or no.\t{a}\n"
            f"Is there a dog in this image? Please answer yes or no.\t{b}\n")
    for k in range(2):
        _img(root / "artwork" / "images" / f"{k}.jpg", k + 2)
        (root / "artwork" / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
        (root / "artwork" / "questions_answers_YN" / f"{k}.txt").write_text(
            "Is this artwork created by Monet? Please answer yes or no.\tYes\n"
            "Is this artwork created by Dali? Please answer yes or no.\tNo\n")
    (root / "code_reasoning").mkdir(parents=True, exist_ok=True)
    _img(root / "code_reasoning" / "0.png", 3)
    (root / "code_reasoning" / "0.txt").write_text(
        "Is the output 3? Please answer yes or no.\tYes\n"
        "Is the output 4? Please answer yes or no.\tNo\n")
    if broken:
        (root / "existence" / "9.txt").write_text("Is there a bus? Please answer yes or no.\tNo"
                                                  "\nIs there a car?\tNo\n")  # no 9.jpg
        (root / "existence" / "0.txt").write_text(
            (root / "existence" / "0.txt").read_text() + "A line without a tab\n")
    return root


def mmbench(root: Path, broken: bool = False, answers: bool = True) -> Path:
    rows = [
        {"index": 0, "question": "What animal is this?", "hint": "nan", "A": "cat",
         "B": "dog", "C": "bird", "D": "fish", "answer": "A", "category": "recognition",
         "image": base64.b64encode(photo(1)).decode(), "source": "x",
         "l2-category": "perception", "comment": "nan", "split": "dev"},
        {"index": 1, "question": "What is shown?", "hint": "A photo.", "A": "coffee",
         "B": "tea", "C": "nan", "D": "nan", "answer": "A", "category": "recognition",
         "image": base64.b64encode(photo(2)).decode(), "source": "x",
         "l2-category": "perception", "comment": "nan", "split": "dev"},
        {"index": 2, "question": "Where is the rocket?", "hint": "nan", "A": "ground",
         "B": "sea", "C": "space", "D": "nan", "answer": "C", "category": "spatial",
         "image": base64.b64encode(photo(3)).decode(), "source": "x",
         "l2-category": "reasoning", "comment": "nan", "split": "dev"},
    ]
    if broken:
        rows.append({**rows[0], "index": 3, "image": "not base64!!"})
        rows.append({**rows[0], "index": 4, "B": "nan", "C": "nan", "D": "nan"})
    if not answers:
        for r in rows:
            r.pop("answer")
    root.mkdir(parents=True, exist_ok=True)
    path = root / "mmbench_dev_en.tsv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return path


def chartqa(root: Path, broken: bool = False) -> Path:
    human = [{"imgname": "c1.png", "query": "What is the value in 2010?", "label": "40"},
             {"imgname": "c2.png", "query": "Which bar is the tallest?", "label": "Blue"}]
    aug = [{"imgname": "c1.png", "query": "What share is red?", "label": "12%"},
           {"imgname": "c2.png", "query": "How many bars?", "label": "4"}]
    if broken:
        aug.append({"imgname": "c404.png", "query": "Missing?", "label": "1"})
        aug.append({"imgname": "c1.png", "label": "1"})
    _dump(root / "test" / "test_human.json", human)
    _dump(root / "test" / "test_augmented.json", aug)
    for i in (1, 2):
        _img(root / "test" / "png" / f"c{i}.png", i)
    return root


def vizwiz(root: Path, broken: bool = False) -> Path:
    def ans(*xs):
        return [{"answer": x, "answer_confidence": "yes"} for x in xs]

    val = [{"image": "VizWiz_val_00000000.jpg", "question": "What is this?",
            "answers": ans(*["coffee"] * 7, *["unanswerable"] * 3), "answer_type": "other",
            "answerable": 1},
           {"image": "VizWiz_val_00000001.jpg", "question": "What does the label say?",
            "answers": ans(*["unanswerable"] * 10), "answer_type": "unanswerable",
            "answerable": 0}]
    if broken:
        val.append({**val[0], "image": "VizWiz_val_00000404.jpg"})
        val.append({**val[0], "image": "VizWiz_val_00000000.jpg", "answers": 5})
    _dump(root / "val.json", val)
    _dump(root / "test.json", [{"image": "VizWiz_test_00000000.jpg", "question": "What?"}])
    for i in (0, 1):
        _img(root / "val" / f"VizWiz_val_{i:08d}.jpg", i)
    _img(root / "test" / "VizWiz_test_00000000.jpg", 2)
    return root


WRITERS = {"vqav2": vqav2, "gqa": gqa, "textvqa": textvqa, "pope": pope,
           "scienceqa": scienceqa, "mme": mme, "mmbench": mmbench, "chartqa": chartqa,
           "vizwiz": vizwiz}


def llava_tree(root: Path) -> Path:
    """LLaVA-1.5's playground/data/eval tree (its docs/Evaluation.md and
    scripts/v1_5/eval/*.sh): each benchmark's folder as LLaVA's scripts read it, with LLaVA's
    own question files where it ships them (VQAv2 test-dev, TextVQA's OCR prompts)."""
    import shutil

    v = root / "vqav2"
    lines = [{"question_id": 70, "image": "COCO_test2015_000000000007.jpg",
              "text": "What is it?\nAnswer the question using a single word or phrase.",
              "category": "default"}]
    v.mkdir(parents=True)
    (v / "llava_vqav2_mscoco_test-dev2015.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines))
    (v / "llava_vqav2_mscoco_test2015.jsonl").write_text(
        "".join(json.dumps({**lines[0], "question_id": q}) + "\n" for q in (70, 80, 90)))
    _img(v / "test2015" / "COCO_test2015_000000000007.jpg", 0)
    gqa(root / "gqa" / "data")
    t = textvqa(root / "textvqa")
    (t / "TextVQA_Rosetta_OCR_v0.2_val.json").unlink()
    (t / "llava_textvqa_val_v051_ocr.jsonl").write_text("".join(json.dumps(
        {"question_id": qid, "image": f"{img}.jpg", "text": text}) + "\n" for qid, img, text in (
        (10, "t1", "what brand is this?\nReference OCR token: SONY, alpha\n"
                   "Answer the question using a single word or phrase."),
        (11, "t2", "what number is shown?\nAnswer the question using a single word or "
                   "phrase."))))
    p = pope(root / "pope" / "coco")
    shutil.move(p / "val2014", root / "pope" / "val2014")
    s = scienceqa(root / "scienceqa")
    (s / "images").mkdir()
    shutil.move(s / "test", s / "images" / "test")
    mme(root / "MME" / "MME_Benchmark_release_version")
    tsv = mmbench(root / "mmbench")
    tsv.rename(tsv.with_name("mmbench_dev_20230712.tsv"))
    w = vizwiz(root / "vizwiz")
    (w / "val.json").unlink()
    shutil.rmtree(w / "val")
    return root
