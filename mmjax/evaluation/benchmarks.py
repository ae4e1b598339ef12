"""LLaVA-1.5's benchmarks: readers of the released files, prompts as LLaVA asked them, scorers.

Each benchmark reads its files as released (paths below, under `--data`), turns every record
into an `Item` (the question as the model is asked it, format prompt included, and the
image), and scores answers with its official metric (`vqa.py`, `scoring.py`). A record that
cannot be asked (a missing image, a field missing or of the wrong type) is a counted skip
with its reason, never a silently smaller denominator: `Skips` goes into the report.

    vqav2      v2_OpenEnded_mscoco_{val2014,test-dev2015}_questions.json,
               v2_mscoco_val2014_annotations.json; images val2014/, test2015/
    gqa        testdev_balanced_questions.json; images images/
    textvqa    TextVQA_0.5.1_val.json (+ TextVQA_Rosetta_OCR_v0.2_val.json for OCR tokens
               not in the questions file); images train_images/
    pope       coco_pope_{adversarial,popular,random}.json (JSON lines); images val2014/
    scienceqa  problems.json, pid_splits.json; images {split}/{pid}/image.png
    mme        the release folder: {subtask}/images + questions_answers_YN, or {subtask}/
               with each image beside its .txt (question TAB answer per line)
    mmbench    an MMBench TSV (base64 images in the `image` column)
    chartqa    test/test_{human,augmented}.json; images test/png/
    vizwiz     {split}.json; images {split}/
    short_answer  any question file (JSON list or JSON lines) of {question_id or id, image,
               question or text, answer, category or kind, facts (optional)}; images relative
               to the file's folder; exact match after the VQA normalisation, facts inside
               the answer, and the answers' form (short / full sentence), per category (the
               demo's held-out questions, your own held-out sets)
"""
from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from mmjax.evaluation import scoring, vqa

SHORT = "Answer the question using a single word or phrase."
CHOICE = "Answer with the option's letter from the given choices directly."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class BenchmarkError(ValueError):
    """The benchmark's files are missing or not in the released layout."""


@dataclasses.dataclass
class Item:
    question_id: Any
    text: str  # the question as asked (format prompt included; no <image>)
    image: Path | bytes | None  # a file, encoded image bytes, or none (text-only)
    ref: dict  # what the scorer needs
    fields: dict = dataclasses.field(default_factory=dict)  # extra answer-line fields

    @property
    def key(self) -> str:
        """Unique per answer line (MMBench asks one question once per rotation)."""
        r = self.fields.get("round_id")
        return f"{self.question_id}" if r is None else f"{self.question_id}#{r}"


class Skips:
    """Records left out, by reason, with the first example of each."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, str] = {}

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, example)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {r: {"count": n, "example": self.examples[r]} for r, n in self.counts.items()}

    def describe(self) -> str:
        return ", ".join(f"{r} {n} (e.g. {self.examples[r]})"
                         for r, n in self.counts.most_common())


class Benchmark:
    """Base: `read()` -> items (fills `skips`), `score(items, texts)`, `submission(...)`."""

    name = ""
    splits: tuple[str, ...] = ("",)
    variants: tuple[str, ...] = ("",)
    max_new_tokens = 16  # short answers; LLaVA's loader allowed 128
    llava_folder = ""  # the benchmark's folder in LLaVA's playground/data/eval tree

    def __init__(self, data: Path, image_root: Path | None = None, split: str = "",
                 variant: str = ""):
        self.data = Path(data)
        if self.llava_folder and (self.data / self.llava_folder).is_dir():
            self.data = self.data / self.llava_folder  # --data names the whole eval tree
        self.split = split or self.default_split()
        self.variant = variant or self.variants[0]
        if self.split not in self.splits:
            raise BenchmarkError(f"{self.name}: split {self.split!r} is not one of "
                                 f"{', '.join(self.splits)}")
        if self.variant not in self.variants:
            raise BenchmarkError(f"{self.name}: variant {self.variant!r} is not one of "
                                 f"{', '.join(self.variants)}")
        self.image_root = Path(image_root) if image_root else None
        self.skips = Skips()
        self.files: list[Path] = []  # what was read (hashed into the report)
        self._keys: set[str] = set()

    def default_split(self) -> str:
        """The split LLaVA-1.5 reports, or the first whose files are there."""
        return self.splits[0]

    # ------------------------------------------------------------------ helpers
    def _file(self, *names: str, required: bool = True) -> Path | None:
        for name in names:
            path = self.data / name
            if path.is_file():
                self.files.append(path)
                return path
        if required:
            raise BenchmarkError(f"{self.name}: {self.data / names[0]} does not exist (see "
                                 "the README's Evaluating section for the layout)")
        return None

    def _json(self, *names: str, required: bool = True):
        path = self._file(*names, required=required)
        if path is None:
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None

    def _images(self, *defaults: str) -> Path:
        """--image-root, else the first of the layouts' image folders that exists."""
        if self.image_root:
            return self.image_root
        return next((self.data / d for d in defaults if (self.data / d).is_dir()),
                    self.data / defaults[0])

    def _image(self, path: Path, qid) -> Path | None:
        if path.is_file():
            return path
        self.skips.add("missing_image", f"{qid}: {path}")
        return None

    def _records(self, records, qid_of: Callable, make: Callable) -> list[Item]:
        """Items from records; a record `make` cannot use (KeyError / TypeError /
        ValueError) is skipped as malformed, one without its image as missing_image."""
        items = []
        for n, rec in enumerate(records):
            try:
                item = make(rec)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                try:
                    qid = qid_of(rec)
                except Exception:
                    qid = f"record {n}"
                self.skips.add("malformed", f"{qid}: {type(e).__name__} {e}")
                continue
            for it in (item if isinstance(item, list) else [item] if item else []):
                if it.key in self._keys:
                    self.skips.add("duplicate_id", f"{it.question_id}")
                    continue
                self._keys.add(it.key)
                items.append(it)
        return items

    def read(self) -> list[Item]:
        """The items of the benchmark's files (skips and files read counted afresh)."""
        self.skips, self.files, self._keys = Skips(), [], set()
        return self._read()

    def _read(self) -> list[Item]:
        raise NotImplementedError

    def score(self, items: list[Item], texts: list[str]) -> dict:
        raise NotImplementedError

    def submission(self, items: list[Item], texts: list[str], out: Path) -> list[Path]:
        return []

    @staticmethod
    def reference(item: Item) -> str:
        """The reference answer of an item, for example tables."""
        r = item.ref
        for key in ("answer", "label"):
            if key in r:
                return str(r[key])
        return str(r.get("answers", [""])[0]) if r.get("answers") else ""

    @property
    def scored(self) -> bool:
        """Whether this split has references (test splits only make submission files)."""
        return True


def _str(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value


def _short(question: str) -> str:
    return f"{_str(question)}\n{SHORT}"


def _write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


class VQAv2(Benchmark):
    """`official` (default): GT-Vision-Lab's vqaEval.py as of 2021; `llava`: LLaVA's route (EvalAI's
    processor over each prediction, then the official scorer: what the server scores of
    LLaVA's upload). Questions from the official files, or for test-dev LLaVA's
    `llava_vqav2_mscoco_test-dev2015.jsonl` (its prompts as they are)."""

    name = "vqav2"
    splits = ("val", "test-dev")
    variants = ("official", "llava")
    llava_folder = "vqav2"
    FILES = {"val": ("v2_OpenEnded_mscoco_val2014_questions.json", "val2014", "COCO_val2014"),
             "test-dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", "test2015",
                          "COCO_test2015")}
    LLAVA = {"test-dev": "llava_vqav2_mscoco_test-dev2015.jsonl"}
    LLAVA_ALL = "llava_vqav2_mscoco_test2015.jsonl"  # every test2015 question (submission)

    def default_split(self):
        # LLaVA's tree has test-dev only (scored by the server)
        if not (self.data / self.FILES["val"][0]).is_file() and (
                (self.data / self.FILES["test-dev"][0]).is_file()
                or (self.data / self.LLAVA["test-dev"]).is_file()):
            return "test-dev"
        return "val"

    def _read(self):
        qfile, folder, prefix = self.FILES[self.split]
        root = self._images(folder)
        llava = self.LLAVA.get(self.split)
        if not (self.data / qfile).is_file() and llava and (self.data / llava).is_file():
            return self._read_llava(self._file(llava), root)
        questions = self._json(qfile)["questions"]
        refs = {}
        if self.split == "val":
            for a in self._json("v2_mscoco_val2014_annotations.json")["annotations"]:
                refs[a["question_id"]] = a

        def make(q):
            qid = int(q["question_id"])
            ref = {}
            if self.split == "val":
                if qid not in refs:
                    raise KeyError("no annotation")
                a = refs[qid]
                ref = {"answers": [_str(x["answer"]) for x in a["answers"]],
                       "answer_type": a.get("answer_type", "other")}
            image = self._image(root / f"{prefix}_{int(q['image_id']):012d}.jpg", qid)
            return image and Item(qid, _short(q["question"]), image, ref)

        return self._records(questions, lambda q: q.get("question_id"), make)

    def _read_llava(self, path: Path, root: Path) -> list[Item]:
        """LLaVA's question file: {question_id, image, text (format prompt included)}."""
        records = _jsonl(path, self.skips)

        def make(q):
            qid = int(q["question_id"])
            image = self._image(root / _str(q["image"]), qid)
            return image and Item(qid, _str(q["text"]), image, {})

        return self._records(records, lambda q: q.get("question_id"), make)

    @property
    def scored(self):
        return self.split == "val"

    def score(self, items, texts):
        scorer = vqa.llava_accuracy if self.variant == "llava" else vqa.official_accuracy
        return _vqa_scores(items, texts, scorer)

    def submission(self, items, texts, out):
        """LLaVA's convert_vqav2_for_submission: every question of test2015 (when its file
        is there; test-dev is scored from it), unanswered ones with an empty answer."""
        answers = {it.question_id: vqa.evalai_normalize(t) for it, t in zip(items, texts)}
        ids = list(answers)
        if self.split == "test-dev":
            full = self._json("v2_OpenEnded_mscoco_test2015_questions.json", required=False)
            if full is not None:
                ids = [q["question_id"] for q in full["questions"]]
            elif (self.data / self.LLAVA_ALL).is_file():
                ids = [q["question_id"] for q in _jsonl(self._file(self.LLAVA_ALL), Skips())]
        return [_write_json(out / f"vqav2_{self.split}_submission.json",
                            [{"question_id": i, "answer": answers.get(i, "")} for i in ids])]


def _jsonl(path: Path, skips: Skips) -> list:
    """The records of a JSON-lines file; a line that is not JSON is a counted skip."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                skips.add("malformed", f"{path.name}:{n}: not JSON ({e.msg})")
    return out


class GQA(Benchmark):
    name = "gqa"
    splits = ("testdev_balanced",)
    llava_folder = "gqa"

    def _read(self):
        # the release's files, or LLaVA's tree (gqa/data/...)
        questions = self._json(f"{self.split}_questions.json", f"data/{self.split}_questions.json")
        root = self._images("images", "data/images")

        def make(kv):
            qid, q = kv
            types = q.get("types") or {}
            image = self._image(root / f"{_str(q['imageId'])}.jpg", qid)
            return image and Item(qid, _short(q["question"]), image,
                                  {"answer": _str(q["answer"]),
                                   "structural": types.get("structural", "?"),
                                   "semantic": types.get("semantic", "?")})

        return self._records(questions.items(), lambda kv: kv[0], make)

    def score(self, items, texts):
        ok = [float(scoring.gqa_prediction(t) == it.ref["answer"])
              for it, t in zip(items, texts)]
        return {"accuracy": _mean(ok),
                **scoring.mean_by(ok, [it.ref["structural"] for it in items], "structural"),
                **scoring.mean_by(ok, [it.ref["semantic"] for it in items], "semantic")}

    def submission(self, items, texts, out):
        return [_write_json(out / f"{self.split}_predictions.json",
                            [{"questionId": it.question_id,
                              "prediction": scoring.gqa_prediction(t)}
                             for it, t in zip(items, texts)])]


class TextVQA(Benchmark):
    """`ocr` (LLaVA-1.5's reported setting): the image's OCR tokens in the prompt."""

    name = "textvqa"
    splits = ("val",)
    variants = ("ocr", "plain")
    llava_folder = "textvqa"
    LLAVA = "llava_textvqa_val_v051_ocr.jsonl"  # LLaVA's questions, OCR prompt included

    def _read(self):
        data = self._json("TextVQA_0.5.1_val.json")["data"]
        ocr: dict = {}
        prompts: dict = {}
        if self.variant == "ocr" and not all("ocr_tokens" in d for d in data):
            rosetta = self._json("TextVQA_Rosetta_OCR_v0.2_val.json", required=False)
            if rosetta is not None:
                ocr = {d["image_id"]: d["ocr_tokens"] for d in rosetta["data"]}
            elif (self.data / self.LLAVA).is_file():  # LLaVA's tree: its prompts as they are
                prompts = {int(q["question_id"]): _str(q["text"])
                           for q in _jsonl(self._file(self.LLAVA), self.skips)}
            else:
                raise BenchmarkError("textvqa: the ocr variant needs OCR tokens: "
                                     f"{self.data / 'TextVQA_Rosetta_OCR_v0.2_val.json'} (or "
                                     f"LLaVA's {self.LLAVA}) does not exist (or use --variant "
                                     "plain)")
        root = self._images("train_images")

        def make(d):
            qid = int(d["question_id"])
            text = _str(d["question"])
            if prompts:
                answers = [_str(a) for a in d["answers"]]
                image = self._image(root / f"{_str(d['image_id'])}.jpg", qid)
                return image and Item(qid, prompts[qid], image, {"answers": answers})
            if self.variant == "ocr":
                tokens = d["ocr_tokens"] if "ocr_tokens" in d else ocr.get(d["image_id"], [])
                if tokens:
                    text += "\nReference OCR token: " + ", ".join(map(_str, tokens))
            answers = [_str(a) for a in d["answers"]]
            image = self._image(root / f"{_str(d['image_id'])}.jpg", qid)
            return image and Item(qid, f"{text}\n{SHORT}", image, {"answers": answers})

        return self._records(data, lambda d: d.get("question_id"), make)

    def score(self, items, texts):
        return {"accuracy": _mean([vqa.textvqa_accuracy(t, it.ref["answers"])
                                   for it, t in zip(items, texts)])}


class POPE(Benchmark):
    name = "pope"
    CATEGORIES = ("adversarial", "popular", "random")
    llava_folder = "pope"

    def _read(self):
        root = self._images("val2014")
        items = []
        for cat in self.CATEGORIES:
            # the release's files, or LLaVA's tree (pope/coco/, images in pope/val2014/)
            path = self._file(f"coco_pope_{cat}.json", f"coco/coco_pope_{cat}.json")
            records = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    self.skips.add("malformed", f"{path.name}:{n}: not JSON ({e.msg})")

            def make(q, cat=cat):
                qid = f"{cat}/{int(q['question_id'])}"
                label = _str(q["label"])
                if label not in ("yes", "no"):
                    raise ValueError(f"label {label!r}")
                image = self._image(root / _str(q["image"]), qid)
                return image and Item(qid, _short(q["text"]), image,
                                      {"label": label, "category": cat},
                                      {"category": cat})

            items += self._records(records, lambda q, c=cat: f"{c}/{q.get('question_id')}",
                                   make)
        return items

    def score(self, items, texts):
        out = {}
        for cat in self.CATEGORIES:
            pairs = [(scoring.pope_label(t), it.ref["label"]) for it, t in zip(items, texts)
                     if it.ref["category"] == cat]
            if pairs:
                m = scoring.pope_metrics(*map(list, zip(*pairs)))
                out.update({f"{cat}/{k}": v for k, v in m.items()})
        for k in ("f1", "accuracy", "precision", "recall", "yes_ratio"):
            vals = [out[f"{c}/{k}"] for c in self.CATEGORIES if f"{c}/{k}" in out]
            out[k] = _mean(vals)  # the mean over the three splits, as LLaVA-1.5 reports
        return out


class ScienceQA(Benchmark):
    """ScienceQA-IMG by default (the questions with an image); `all` asks every question."""

    name = "scienceqa"
    splits = ("test", "val", "minival", "train")
    variants = ("img", "all")
    llava_folder = "scienceqa"
    LETTERS = "ABCDE"

    def _read(self):
        problems = self._json("problems.json")
        pids = self._json("pid_splits.json")[self.split]
        root = self._images(self.split, f"images/{self.split}")  # LLaVA's tree: images/test

        def make(pid):
            p = problems[pid]
            if not isinstance(p["choices"], list):
                raise TypeError("choices is not a list")
            choices = [_str(c) for c in p["choices"]]
            if not 2 <= len(choices) <= len(self.LETTERS):
                raise ValueError(f"{len(choices)} choices")
            has_image = bool(p.get("image"))
            if self.variant == "img" and not has_image:
                return None
            text = f"{_str(p['question'])}\n" + "\n".join(
                f"{self.LETTERS[i]}. {c}" for i, c in enumerate(choices))
            if p.get("hint"):
                text = f"Context: {_str(p['hint'])}\n{text}"
            image = None
            if has_image:
                image = self._image(root / pid / _str(p["image"]), pid)
                if image is None:
                    return None
            return Item(pid, f"{text}\n{CHOICE}", image,
                        {"answer": int(p["answer"]), "n": len(choices), "image": has_image})

        return self._records(pids, lambda pid: pid, make)

    @staticmethod
    def reference(item):
        return ScienceQA.LETTERS[item.ref["answer"]]

    def score(self, items, texts):
        """LLaVA's eval_science_qa.py: `accuracy` over the items asked (with the default
        `img` variant, its IMG-Accuracy), `img_accuracy` over those with an image,
        `unparsed` (its FAILED: no letter read). `lenient_accuracy` (not LLaVA's figure)
        also reads 'The answer is A' with nothing after the letter, a letter before a
        newline or after a space, repeated sentences."""
        letters = [scoring.sqa_letter(t, it.ref["n"]) for it, t in zip(items, texts)]
        ok = [float(a == self.LETTERS[it.ref["answer"]]) for a, it in zip(letters, items)]
        img = [o for o, it in zip(ok, items) if it.ref["image"]]
        lenient = [float(scoring.sqa_letter_lenient(t, it.ref["n"]) ==
                         self.LETTERS[it.ref["answer"]]) for it, t in zip(items, texts)]
        return {"accuracy": _mean(ok), "img_accuracy": _mean(img),
                "unparsed": sum(scoring.sqa_parse(t) is None for t in texts),
                "lenient_accuracy": _mean(lenient)}


class MME(Benchmark):
    name = "mme"
    max_new_tokens = 8
    llava_folder = "MME"
    RELEASE = "MME_Benchmark_release_version"  # the release's folder, as LLaVA's tree holds it

    def _read(self):
        if (self.data / self.RELEASE).is_dir():
            self.data = self.data / self.RELEASE
        if not self.data.is_dir():
            raise BenchmarkError(f"mme: {self.data} is not a directory")
        tasks = scoring.MME_PERCEPTION + scoring.MME_COGNITION
        present = [t for t in tasks if (self.data / t).is_dir()]
        if not present:
            raise BenchmarkError(f"mme: no subtask folders ({', '.join(tasks[:3])}, ...) in "
                                 f"{self.data}")
        items = []
        for task in present:
            folder = self.data / task
            qa_dir = folder / "questions_answers_YN"
            img_dir = folder / "images" if qa_dir.is_dir() else folder
            txts = sorted((qa_dir if qa_dir.is_dir() else folder).glob("*.txt"))
            self.files += txts
            for txt in txts:
                image = next((p for p in (img_dir / (txt.stem + s) for s in IMAGE_SUFFIXES)
                              if p.is_file()), None)
                lines = [ln for ln in txt.read_text().splitlines() if ln.strip()]
                for k, line in enumerate(lines):
                    qid = f"{task}/{txt.stem}/{k}"
                    parts = line.split("\t")
                    if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                        self.skips.add("malformed", f"{qid}: {line[:60]!r}")
                        continue
                    if image is None:
                        self.skips.add("missing_image", f"{qid}: {img_dir / txt.stem}.*")
                        continue
                    question = parts[0].strip().replace(" Please answer yes or no.", "")
                    items.append(Item(qid, _short(question), image,
                                      {"answer": parts[1].strip().lower(), "task": task,
                                       "image": image.name}, {"category": task}))
        return items

    def score(self, items, texts):
        return scoring.mme_scores([(it.ref["task"], it.ref["image"],
                                    scoring.mme_label(t) == it.ref["answer"])
                                   for it, t in zip(items, texts)])


class MMBench(Benchmark):
    """Circular evaluation (LLaVA's --all-rounds): each question asked once per rotation of
    its options; right only if every rotation is. `single` asks the released order only."""

    name = "mmbench"
    variants = ("circular", "single")
    llava_folder = "mmbench"
    LETTERS = "ABCD"
    LLAVA_TSV = "mmbench_dev_20230712.tsv"  # the split LLaVA-1.5 reports

    def _read(self):
        path = self.data
        if path.is_dir():
            tsvs = sorted(path.glob("*.tsv"))
            if (path / self.LLAVA_TSV).is_file():
                tsvs = [path / self.LLAVA_TSV]
            if len(tsvs) != 1:
                raise BenchmarkError(f"mmbench: {path} holds {len(tsvs)} .tsv files; pass the "
                                     "TSV itself as --data")
            path = tsvs[0]
        if not path.is_file():
            raise BenchmarkError(f"mmbench: {path} does not exist")
        self.files.append(path)
        csv.field_size_limit(sys.maxsize)
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))

        def make(row):
            options = []
            for letter in self.LETTERS:
                v = row.get(letter)
                if v is None or v.strip().lower() in ("", "nan", "none"):
                    break
                options.append(v)
            if len(options) < 2:
                raise ValueError(f"{len(options)} options")
            image = base64.b64decode(row["image"], validate=True)
            hint = row.get("hint") or ""
            answer = (row.get("answer") or "").strip()
            rounds = len(options) if self.variant == "circular" else 1
            out = []
            for r in range(rounds):
                opts = options[r:] + options[:r]
                chars = list(self.LETTERS[:len(options)])
                chars = chars[r:] + chars[:r]
                text = row["question"]
                if hint.strip().lower() not in ("", "nan", "none"):
                    text = f"{hint}\n{text}"
                text += "".join(f"\n{c}. {o}" for c, o in zip(self.LETTERS, opts))
                ref = {"index": row["index"], "options": opts, "round": r,
                       "category": row.get("category", ""),
                       "l2": row.get("l2-category", "")}
                if answer:
                    ref["answer"] = options[self.LETTERS.index(answer)]
                out.append(Item(int(row["index"]), f"{text}\n{CHOICE}", image, ref,
                                {"round_id": r, "options": opts, "option_char": chars}))
            return out

        items = self._records(rows, lambda row: row.get("index"), _safe_b64(make))
        # the test TSVs have no answers: answered for the server, not scored here
        self.has_answers = bool(items) and all("answer" in it.ref for it in items)
        return items

    @property
    def scored(self):
        return self.has_answers

    def score(self, items, texts):
        """MMBench's circular evaluation: a question is right only when the answer to every
        rotation of its options is (MMBench's evaluator's reading, `scoring.mmbench_letter`).
        With no GPT judge here, an answer it cannot read counts wrong (VLMEvalKit's
        `exact_matching`); `unmatched` counts them."""
        rounds: dict = {}
        unmatched = 0
        for it, t in zip(items, texts):
            opts = dict(zip(self.LETTERS, it.ref["options"]))
            letter = scoring.mmbench_letter(t, opts)
            unmatched += letter is None
            ok = letter in opts and opts[letter] == it.ref["answer"]
            rounds.setdefault(it.question_id, (it.ref, []))[1].append((it.ref["round"], ok))
        circular = [float(all(ok for _, ok in rs)) for _, rs in rounds.values()]
        single = [float(dict(rs).get(0, False)) for _, rs in rounds.values()]
        refs = [ref for ref, _ in rounds.values()]
        out = {"accuracy": _mean(circular if self.variant == "circular" else single),
               "single_pass_accuracy": _mean(single), "questions": len(rounds),
               "unmatched": unmatched}
        out.update(scoring.mean_by(circular, [r["category"] for r in refs], "category"))
        out.update(scoring.mean_by(circular, [r["l2"] for r in refs], "l2_category"))
        return out

    def submission(self, items, texts, out):
        """LLaVA's convert_mmbench_for_submission: the TSV's columns less the image, hint,
        category, source, comment and l2-category, with `prediction` (the answer to the
        released option order) as the seventh column; .xlsx for the MMBench server."""
        path = self.files[0]
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            rows = list(reader)
            columns = [c for c in reader.fieldnames or [] if c not in (
                "hint", "category", "source", "image", "comment", "l2-category")]
        columns.insert(min(6, len(columns)), "prediction")
        pred = {it.question_id: t for it, t in zip(items, texts) if it.ref["round"] == 0}
        table = [[(pred.get(int(r["index"])) if c == "prediction" else r.get(c)) for c in columns]
                 for r in rows]
        try:
            import openpyxl  # optional extra (eval)
        except ImportError:
            dst = out / "mmbench_submission.tsv"
            with open(dst, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f, delimiter="\t")
                w.writerow(columns)
                w.writerows(table)
            print(f"openpyxl is not installed (pip install 'mmjax[eval]'): wrote {dst} "
                  "instead of the .xlsx the MMBench server takes", file=sys.stderr)
            return [dst]
        book = openpyxl.Workbook()
        sheet = book.active
        sheet.append(columns)
        for row in table:
            sheet.append(row)
        dst = out / "mmbench_submission.xlsx"
        book.save(dst)
        return [dst]


def _safe_b64(make):
    def wrapped(row):
        try:
            return make(row)
        except binascii.Error as e:
            raise ValueError(f"image is not base64 ({e})") from None
    return wrapped


class ChartQA(Benchmark):
    name = "chartqa"
    splits = ("test",)
    PARTS = ("human", "augmented")

    def _read(self):
        rel = f"{self.split}/" if (self.data / self.split).is_dir() else ""
        root = self._images(f"{rel}png")
        items = []
        for part in self.PARTS:
            records = self._json(f"{rel}{self.split}_{part}.json")

            def make(nd, part=part):
                n, d = nd
                qid = f"{part}/{n}"
                image = self._image(root / _str(d["imgname"]), qid)
                return image and Item(qid, _short(d["query"]), image,
                                      {"label": str(d["label"]), "part": part},
                                      {"category": part})

            items += self._records(list(enumerate(records)), lambda nd, p=part: f"{p}/{nd[0]}",
                                   make)
        return items

    def score(self, items, texts):
        ok = [float(scoring.relaxed_correct(it.ref["label"], t.strip()))
              for it, t in zip(items, texts)]
        parts = scoring.mean_by(ok, [it.ref["part"] for it in items], "relaxed_accuracy")
        # ChartQA reports the mean of the human and augmented sets
        return {"relaxed_accuracy": _mean(list(parts.values())), **parts}


class VizWiz(Benchmark):
    """`official` (default): the VizWiz API's vqaEval.py; `llava`: LLaVA's route (EvalAI's
    processor over each prediction first, convert_vizwiz_for_submission.py). Unanswerability
    as the VizWiz API scores it: a prediction is 'unanswerable' when its normalised answer
    is, average precision and F1 over that against the annotations' `answerable`."""

    name = "vizwiz"
    splits = ("val", "test")
    variants = ("official", "llava")
    max_new_tokens = 16
    llava_folder = "vizwiz"

    def default_split(self):
        # LLaVA's tree has test only (scored by the server)
        if not (self.data / "val.json").is_file() and (self.data / "test.json").is_file():
            return "test"
        return "val"

    def _read(self):
        records = self._json(f"{self.split}.json")
        root = self._images(self.split)

        def make(d):
            name = _str(d["image"])
            ref = {}
            if self.split == "val":
                ref = {"answers": [_str(a["answer"]) for a in d["answers"]],
                       "answer_type": d.get("answer_type", "other"),
                       "answerable": int(d.get("answerable", 1))}
            image = self._image(root / name, name)
            return image and Item(name, f"{_str(d['question'])}\n{UNANSWERABLE}\n{SHORT}",
                                  image, ref)

        return self._records(records, lambda d: d.get("image"), make)

    @property
    def scored(self):
        return self.split == "val"

    def score(self, items, texts):
        if self.variant == "llava":
            texts = [vqa.evalai_normalize(t) for t in texts]
        said = [vqa.vizwiz_normalize(t) == "unanswerable" for t in texts]
        truth = [not it.ref["answerable"] for it in items]
        m = scoring.pope_metrics(["yes" if s else "no" for s in said],
                                 ["yes" if t else "no" for t in truth])
        return {**_vqa_scores(items, texts, vqa.vizwiz_accuracy),
                "unanswerable/average_precision": scoring.average_precision(truth, said),
                "unanswerable/f1": m["f1"], "unanswerable/precision": m["precision"],
                "unanswerable/recall": m["recall"]}

    def submission(self, items, texts, out):
        return [_write_json(out / f"vizwiz_{self.split}_submission.json",
                            [{"image": it.question_id, "answer": vqa.evalai_normalize(t)}
                             for it, t in zip(items, texts)])]


class ShortAnswer(Benchmark):
    name = "short_answer"

    def _read(self):
        path = self.data
        if not path.is_file():
            raise BenchmarkError(f"short_answer: {path} does not exist (a JSON or JSON-lines "
                                 "file of questions)")
        self.files.append(path)
        text = path.read_text()
        try:
            records = json.loads(text) if text.lstrip().startswith("[") else [
                json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
        root = self.image_root or path.parent

        def make(nd):
            n, d = nd
            qid = d.get("question_id", d.get("id", n))
            image = None
            if d.get("image"):
                image = self._image(root / _str(d["image"]), qid)
                if image is None:
                    return None
            question = _str(d["question"] if "question" in d else d["text"])
            facts = d.get("facts", [d["answer"]])
            if not isinstance(facts, list):
                raise TypeError("facts is not a list")
            return Item(qid, question, image,
                        {"answer": _str(d["answer"]), "facts": [_str(f) for f in facts],
                         "category": str(d.get("category", d.get("kind", "all")))},
                        {"category": str(d.get("category", d.get("kind", "all")))})

        return self._records(list(enumerate(records)),
                             lambda nd: nd[1].get("question_id", nd[1].get("id", nd[0]))
                             if isinstance(nd[1], dict) else f"record {nd[0]}", make)

    def score(self, items, texts):
        """Exact match (`accuracy`), and how the answers are put: `fact_accuracy` (the
        record's facts, default its answer, all inside the answer), `short_share` (one to
        three words), `sentence_share` (full sentences); each also per category."""
        cats = [it.ref["category"] for it in items]
        per = {
            "accuracy": [float(vqa.normalize_answer(t) == vqa.normalize_answer(it.ref["answer"]))
                         for it, t in zip(items, texts)],
            "fact_accuracy": [float(scoring.has_facts(t, it.ref["facts"]))
                              for it, t in zip(items, texts)],
            "short_share": [float(scoring.is_short(t)) for t in texts],
            "sentence_share": [float(scoring.is_sentence(t)) for t in texts]}
        out = {k: _mean(v) for k, v in per.items()}
        for k, v in per.items():
            out.update(scoring.mean_by(v, cats, k))
        return out


def _vqa_scores(items, texts, scorer) -> dict:
    """VQA accuracy over ten human answers, overall and per answer type (VQAv2, VizWiz)."""
    acc = [scorer(t, it.ref["answers"]) for it, t in zip(items, texts)]
    return {"accuracy": _mean(acc),
            **scoring.mean_by(acc, [it.ref["answer_type"] for it in items], "accuracy")}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


BENCHMARKS: dict[str, type[Benchmark]] = {
    b.name: b for b in (VQAv2, GQA, TextVQA, POPE, ScienceQA, MME, MMBench, ChartQA, VizWiz,
                        ShortAnswer)}


def in_tree(root: Path) -> list[str]:
    """The benchmarks whose folder LLaVA's playground/data/eval tree `root` holds."""
    return [name for name, cls in BENCHMARKS.items()
            if cls.llava_folder and (Path(root) / cls.llava_folder).is_dir()]


def get(name: str, data, image_root=None, split: str = "", variant: str = "") -> Benchmark:
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](Path(data), image_root, split, variant)
