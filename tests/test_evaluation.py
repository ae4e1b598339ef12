"""The benchmark suite: each scorer against scores worked out by hand from the official
definitions, each reader on a fixture in the released layout (prompts as LLaVA-1.5 asked),
counted skips for broken records, and `mmjax.evaluate` end to end with a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import eval_fixtures as fx
import pytest

from mmjax.evaluation import benchmarks as B
from mmjax.evaluation import scoring, vqa

# ---------------------------------------------------------------- scorers


@pytest.mark.parametrize("pred, answers, expected", [
    ("two", fx.TEN, 1.0),  # "two" -> "2": 5 of the others say "2"
    ("3", fx.TEN, 0.9),  # three "3": 2/3 when one of them is left out, else 1
    ("Two dogs", fx.TEN, 0.0),
    ("yes.", ["yes"] * 10, 0.0),  # ten identical answers: neither side is normalised
    ("a dog", ["dog"] * 4 + ["a dog"] * 3 + ["cat"] * 3, 1.0),  # both sides lose "a"
    ("cat", ["dog"] * 4 + ["a dog"] * 3 + ["cat"] * 3, 0.9),
    ("dog", ["dog", "dog"] + ["cat"] * 8, 0.6),  # 2 matches: 1/3 or 2/3
    ("1", ["1"] * 5 + ["2"] * 5, 1.0),  # a tie: both halves score fully
])
def test_vqa_accuracy_by_hand(pred, answers, expected):
    assert vqa.official_accuracy(pred, answers) == pytest.approx(expected)


def test_evalai_processor_and_textvqa_soft_scores():
    n = vqa.evalai_normalize
    assert n("Sony.") == "sony" and n("Two") == "2" and n("the cat's toy?") == "cat 's toy"
    assert n("10,000") == "10000" and n("a, b") == "b"
    # "two" becomes "2" on the human side too (as VQAv2's scorer does since 2021; VizWiz's
    # compares the human answers as they are)
    answers = ["2", "2", "two"] + ["3"] * 7
    assert vqa.textvqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa.official_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa.vizwiz_accuracy("two", answers) == pytest.approx(0.6)
    assert vqa.soft_scores(["a"] * 3 + ["b"] * 7) == {"a": pytest.approx(0.9), "b": 1.0}


@pytest.mark.parametrize("text, label", [
    ("Yes, there is a cat in the image.", "yes"), ("No.", "no"), ("no", "no"),
    ("There is not a dog.", "no"), ("I think so", "yes"), ("Yes. But no dog.", "yes"),
    ("Nope", "yes"),  # only the words no / not / No count
])
def test_pope_label(text, label):
    assert scoring.pope_label(text) == label


def test_pope_metrics_by_hand():
    m = scoring.pope_metrics(["yes", "no", "no", "yes", "yes"], ["yes", "no", "yes", "no",
                                                                 "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(0.6)
    assert m["yes_ratio"] == pytest.approx(0.6)
    assert scoring.pope_metrics(["no"], ["no"])["precision"] == 0.0  # no positives: no crash


@pytest.mark.parametrize("text, label", [("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"),
                                         ("Not really", "no"), ("Maybe", "other"),
                                         ("I think yes", "other")])
def test_mme_label(text, label):
    assert scoring.mme_label(text) == label


@pytest.mark.parametrize("text, n, letter, lenient", [
    ("A", 2, "A", "A"), ("B. water", 3, "B", "B"), ("The answer is C.", 4, "C", "C"),
    ("The answer is D", 4, None, "D"),  # LLaVA's pattern needs a character after the letter
    ("E", 2, None, None), ("water", 3, None, None), ("A\nbecause", 2, None, "A"),
    (" B ", 3, None, "B"), ("", 2, None, None), ("AB", 2, None, None),
])
def test_sqa_letter(text, n, letter, lenient):
    assert scoring.sqa_letter(text, n) == letter
    assert scoring.sqa_letter_lenient(text, n) == lenient


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(C) bird", "C"), ("The answer is D.", "D"), ("dog", "B"),
    ("A or B", None), ("it is a cat or a dog", None), ("I cannot tell", None),
])
def test_mmbench_letter(text, letter):
    assert scoring.mmbench_letter(text, {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}) \
        == letter


@pytest.mark.parametrize("target, pred, ok", [
    ("40", "41", True), ("40", "42.1", False), ("12%", "0.12", True), ("12%", "13%", False),
    ("Blue", "blue", True), ("4", "four", False), ("0", "0", True), ("0", "0.0", False),
])
def test_relaxed_correct(target, pred, ok):
    assert scoring.relaxed_correct(target, pred) is ok


def test_mme_scores_by_hand():
    recs = [("existence", "0", True), ("existence", "0", True), ("existence", "1", False),
            ("existence", "1", True), ("code_reasoning", "0", True),
            ("code_reasoning", "0", True)]
    s = scoring.mme_scores(recs)
    assert s["existence/accuracy"] == 0.75 and s["existence/accuracy_plus"] == 0.5
    assert s["existence/score"] == 125 and s["perception"] == 125 and s["cognition"] == 200
    assert s["total"] == 325


# ---------------------------------------------------------------- readers and scores

# per benchmark: (fixture kwargs, Benchmark kwargs, texts answering the items in order,
# expected metrics, the prompt of the first item)
CASES = {
    # the official scorer leaves "yes." unnormalised when all ten humans said "yes" (0/1)
    "vqav2": ({}, {}, ["Two", "yes.", "cat"],
              {"accuracy": 1.9 / 3, "accuracy/number": 1.0, "accuracy/other": 0.9,
               "accuracy/yes/no": 0.0},
              f"How many cats?\n{B.SHORT}"),
    "gqa": ({}, {}, ["Gray.", "yes", "right"],
            {"accuracy": 2 / 3, "structural/query": 0.5, "structural/verify": 1.0,
             "semantic/rel": 0.0}, f"What color is the cat?\n{B.SHORT}"),
    "textvqa": ({}, {}, ["Sony", "two"], {"accuracy": 0.95},
                f"what brand is this?\nReference OCR token: SONY, alpha\n{B.SHORT}"),
    "pope": ({}, {}, ["Yes, there is a cat.", "No.", "There is not a cup", "I think so"] * 2
             + ["yes"] * 4,
             {"adversarial/f1": 0.5, "random/f1": 2 / 3, "random/recall": 1.0,
              "f1": (0.5 + 0.5 + 2 / 3) / 3, "accuracy": 0.5, "yes_ratio": 2 / 3},
             f"Is there a cat in the image?\n{B.SHORT}"),
    "scienceqa": ({}, {}, ["A", "C. a tree", "The answer is B."],
                  {"accuracy": 2 / 3, "img_accuracy": 2 / 3, "unparsed": 0},
                  f"Which animal is shown?\nA. cat\nB. dog\n{B.CHOICE}"),
    "mme": ({}, {}, ["Yes", "No", "Yes", "Yes", "yes, it is", "no", "Maybe", "No", "Yes.",
                     "Not sure"],
            {"artwork/score": 125.0, "code_reasoning/score": 200.0,
             "existence/score": 125.0, "perception": 250.0, "cognition": 200.0},
            f"Is there a cat in this image?\n{B.SHORT}"),
    "mmbench": ({}, {}, ["A", "D", "C", "B", "A", "A", "C", "The answer is B", "space"],
                {"accuracy": 2 / 3, "single_pass_accuracy": 1.0,
                 "category/recognition": 0.5, "category/spatial": 1.0, "questions": 3},
                f"What animal is this?\nA. cat\nB. dog\nC. bird\nD. fish\n{B.CHOICE}"),
    "chartqa": ({}, {}, ["41", "blue", "0.12", "five"],
                {"relaxed_accuracy": 0.75, "relaxed_accuracy/human": 1.0,
                 "relaxed_accuracy/augmented": 0.5},
                f"What is the value in 2010?\n{B.SHORT}"),
    "vizwiz": ({}, {}, ["unanswerable", "Unanswerable"],
               {"accuracy": 0.95, "accuracy/other": 0.9, "unanswerable/precision": 0.5,
                "unanswerable/recall": 1.0, "unanswerable/f1": 2 / 3},
               f"What is this?\n{B.UNANSWERABLE}\n{B.SHORT}"),
}


def _bench(name, tmp_path, broken=False, fixture_kw=None, **kw):
    data = fx.WRITERS[name](tmp_path / name, broken=broken, **(fixture_kw or {}))
    return B.get(name, data, **kw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reader_prompts_and_hand_computed_scores(name, tmp_path):
    fixture_kw, kw, texts, expected, first_prompt = CASES[name]
    bench = _bench(name, tmp_path, fixture_kw=fixture_kw, **kw)
    items = bench.read()
    assert bench.skips.total == 0, bench.skips.describe()
    assert len(items) == len(texts)
    assert items[0].text == first_prompt
    assert all(isinstance(it.image, bytes) or Path(it.image).is_file() for it in items)
    got = bench.score(items, texts)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v), (k, got)


def test_mme_items_in_order_of_subtask_and_file(tmp_path):
    items = _bench("mme", tmp_path).read()
    assert [it.question_id for it in items][:3] == ["existence/0/0", "existence/0/1",
                                                    "existence/1/0"]


def test_mmbench_rotations_follow_llava(tmp_path):
    items = _bench("mmbench", tmp_path).read()
    r1 = items[1]
    assert r1.fields == {"round_id": 1, "options": ["dog", "bird", "fish", "cat"],
                         "option_char": ["B", "C", "D", "A"]}
    assert r1.text.endswith("A. dog\nB. bird\nC. fish\nD. cat\n" + B.CHOICE)
    assert [it.key for it in items[:5]] == ["0#0", "0#1", "0#2", "0#3", "1#0"]
    hint = items[4].text
    assert hint.startswith("A photo.\nWhat is shown?\nA. coffee\nB. tea\n")
    single = _bench("mmbench", tmp_path / "s", variant="single").read()
    assert len(single) == 3


def test_variants_textvqa_plain_ocr_inline_and_scienceqa_all(tmp_path):
    plain = _bench("textvqa", tmp_path / "a", variant="plain").read()
    assert plain[0].text == f"what brand is this?\n{B.SHORT}"
    inline = _bench("textvqa", tmp_path / "b", fixture_kw={"ocr_in_questions": True}).read()
    assert "Reference OCR token: SONY, alpha" in inline[0].text
    assert inline[1].text == f"what number is shown?\n{B.SHORT}"  # no tokens, no line
    sqa = _bench("scienceqa", tmp_path / "c", variant="all")
    items = sqa.read()
    assert [it.question_id for it in items] == ["1", "2", "3", "4"] and items[1].image is None
    assert items[1].text.startswith("Context: Think about it.\nWhich is a liquid?\nA. rock")
    s = sqa.score(items, ["A", "B", "C. a tree", "The answer is B."])
    assert s["accuracy"] == 0.75 and s["img_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(B.BenchmarkError, match="variant 'x'"):
        B.get("textvqa", tmp_path / "a", variant="x")


BROKEN = {"vqav2": {"missing_image": 1, "malformed": 1},
          "gqa": {"missing_image": 1, "malformed": 1},
          "textvqa": {"missing_image": 1, "malformed": 1},
          "pope": {"missing_image": 1, "malformed": 2},  # a bad label and a torn JSON line
          "scienceqa": {"missing_image": 1, "malformed": 1},
          "mme": {"missing_image": 2, "malformed": 1},  # both questions of the lost image
          "mmbench": {"malformed": 2},  # an image that is not base64, one option only
          "chartqa": {"missing_image": 1, "malformed": 1},
          "vizwiz": {"missing_image": 1, "malformed": 1}}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_records_are_counted_skips(name, tmp_path):
    bench = _bench(name, tmp_path, broken=True)
    items = bench.read()
    assert dict(bench.skips.counts) == BROKEN[name]
    assert len(items) == len(CASES[name][2])  # the good records are all there
    assert all(bench.skips.examples.values())


def test_missing_files_say_where_they_should_be(tmp_path):
    with pytest.raises(B.BenchmarkError, match="testdev_balanced_questions.json does not"):
        B.get("gqa", tmp_path).read()
    fx.textvqa(tmp_path / "t")
    (tmp_path / "t" / "TextVQA_Rosetta_OCR_v0.2_val.json").unlink()
    with pytest.raises(B.BenchmarkError, match="--variant plain"):
        B.get("textvqa", tmp_path / "t").read()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "problems.json").write_text("{not json")
    with pytest.raises(B.BenchmarkError, match="problems.json: not JSON"):
        B.get("scienceqa", tmp_path / "bad").read()


# ---------------------------------------------------------------- mmjax.evaluate


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A llava-hf directory: tiny random CLIP + Llama with a trained BPE tokenizer."""
    import transformers as tf

    from data_fixtures import bpe_tokenizer
    from hf_fixtures import llava_config, make_model, save

    root = tmp_path_factory.mktemp("eval-model")
    corpus = ["Answer the question using a single word or phrase.", "yes no cat dog A B C D",
              "A chat between a curious user and an artificial intelligence assistant."] * 20
    tok = bpe_tokenizer(root, corpus, vocab_size=300)
    cfg = llava_config("clip", "llama", image_token_id=tok.convert_tokens_to_ids("<image>"))
    cfg.text_config.vocab_size = len(tok)
    cfg.text_config.eos_token_id = tok.eos_token_id
    save(make_model(tf.LlavaForConditionalGeneration, cfg), root)
    return root


def _evaluate(*args):
    from mmjax import evaluate

    return evaluate.main([str(a) for a in args])


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_evaluate_command_end_to_end(name, tiny_hf, tmp_path, capsys):
    """Every benchmark through `python -m mmjax.evaluate` with the tiny model, on the
    broken fixture: every good record answered once in LLaVA's layout, the skips reported."""
    data = fx.WRITERS[name](tmp_path / "data", broken=True)
    out = tmp_path / "out"
    report = _evaluate("--hf", tiny_hf, "--benchmark", name, "--data", data, "--out", out,
                       "--max-new-tokens", 3, "--batch-size", 8)
    lines = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == len(CASES[name][2]) == report["answer_lines"]
    assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(
        lines[0])
    saved = json.loads((out / "results.json").read_text())
    assert saved["skipped"] == sum(BROKEN[name].values())
    assert {k: v["count"] for k, v in saved["skipped_by_reason"].items()} == BROKEN[name]
    assert saved["metrics"] and all(isinstance(v, (int, float)) for v in
                                    saved["metrics"].values())
    assert saved["data_files"] and all(len(h) == 64 for h in saved["data_files"].values())
    assert saved["model"]["template"] == "vicuna_v1"
    printed = capsys.readouterr().out
    assert "record(s) skipped, not scored" in printed and "| metric | value |" in printed
    assert (out / "results.md").read_text().startswith(f"## {name}")


def test_evaluate_scores_saved_answers_resumes_and_compares(tiny_hf, tmp_path, capsys):
    """Answers already in answers.jsonl are not asked again: pre-filled with the hand-picked
    texts, the command reports exactly the hand-computed metrics."""
    data = fx.vqav2(tmp_path / "data")
    bench = B.get("vqav2", data)
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    for out, texts in ((out_a, CASES["vqav2"][2]), (out_b, ["3", "yes", "a dog"])):
        out.mkdir()
        with open(out / "answers.jsonl", "w") as f:
            for it, t in zip(bench.read(), texts):
                f.write(json.dumps({"question_id": it.question_id, "text": t}) + "\n")
        _evaluate("--hf", tiny_hf, "--benchmark", "vqav2", "--data", data, "--out", out)
    a = json.loads((out_a / "results.json").read_text())
    assert a["metrics"]["accuracy"] == pytest.approx(1.9 / 3)
    assert len((out_a / "answers.jsonl").read_text().splitlines()) == 3  # nothing re-asked
    capsys.readouterr()
    _evaluate("--compare", out_a / "results.json", out_b / "results.json")
    table = capsys.readouterr().out
    assert "| accuracy | 0.6333 | 0.9667 | 0.3333 |" in table  # "3": 3 of 10 humans -> 0.9
    assert "| accuracy/yes/no | 0.0000 | 1.0000 | 1.0000 |" in table


def test_submission_files_for_the_official_servers(tiny_hf, tmp_path):
    data = fx.vqav2(tmp_path / "v")
    out = tmp_path / "test-dev"
    report = _evaluate("--hf", tiny_hf, "--benchmark", "vqav2", "--split", "test-dev",
                       "--data", data, "--out", out, "--max-new-tokens", 2)
    assert report["metrics"] == {}  # no references for test-dev
    sub = json.loads((out / "vqav2_test-dev_submission.json").read_text())
    assert [s["question_id"] for s in sub] == [70, 80] and sub[1]["answer"] == ""
    # MMBench's test TSV (no answers): the .xlsx LLaVA's converter writes
    openpyxl = pytest.importorskip("openpyxl")
    tsv = fx.mmbench(tmp_path / "m", answers=False)
    out = tmp_path / "mmb"
    report = _evaluate("--hf", tiny_hf, "--benchmark", "mmbench", "--data", tsv, "--out", out,
                       "--max-new-tokens", 2)
    assert report["metrics"] == {} and report["answer_lines"] == 9
    sheet = openpyxl.load_workbook(out / "mmbench_submission.xlsx").active
    rows = list(sheet.values)
    assert rows[0] == ("index", "question", "A", "B", "C", "D", "prediction", "split")
    answers = {json.loads(x)["question_id"]: json.loads(x)["text"] for x in
               (out / "answers.jsonl").read_text().splitlines()
               if json.loads(x)["round_id"] == 0}
    assert [r[6] or "" for r in rows[1:]] == [answers[i] for i in (0, 1, 2)]


# LLaVA's playground/data/eval tree: (split chosen by default, items read) per benchmark
TREE = {"vqav2": ("test-dev", 1), "gqa": ("testdev_balanced", 3), "textvqa": ("val", 2),
        "pope": ("", 12), "scienceqa": ("test", 3), "mme": ("", 10), "mmbench": ("", 9),
        "vizwiz": ("test", 1)}


def test_llava_eval_tree_read_with_data_only(tmp_path):
    """--data naming LLaVA's eval tree, or a benchmark's folder in it, is all a reader needs:
    the split LLaVA reports, LLaVA's own question files and prompts where it ships them."""
    tree = fx.llava_tree(tmp_path / "eval")
    assert sorted(B.in_tree(tree)) == sorted(TREE)
    for name, (split, n) in TREE.items():
        for data in (tree, tree / B.BENCHMARKS[name].llava_folder):
            bench = B.get(name, data)
            items = bench.read()
            assert (bench.split, len(items), bench.skips.total) == (split, n, 0), (name, data)
    assert B.get("textvqa", tree).read()[0].text == CASES["textvqa"][4]
    assert B.get("vqav2", tree).read()[0].text == f"What is it?\n{B.SHORT}"
    assert B.get("mmbench", tree).read()[0].text == CASES["mmbench"][4]


def test_evaluate_all_on_llava_tree(tiny_hf, tmp_path):
    """`--benchmark all` runs every benchmark the tree holds with one model load: scores
    where the split has references, the servers' files where it has none."""
    tree = fx.llava_tree(tmp_path / "eval")
    out = tmp_path / "out"
    reports = _evaluate("--hf", tiny_hf, "--benchmark", "all", "--data", tree, "--out", out,
                        "--max-new-tokens", 2, "--batch-size", 8)
    assert sorted(reports) == sorted(TREE)
    for name, (split, n) in TREE.items():
        saved = json.loads((out / (name + (f"-{split}" if split else "")) / "results.json")
                           .read_text())
        assert reports[name]["answer_lines"] == n and saved["skipped"] == 0
        assert bool(saved["metrics"]) == (name not in ("vqav2", "vizwiz")), name
    sub = json.loads((out / "vqav2-test-dev" / "vqav2_test-dev_submission.json").read_text())
    assert [s["question_id"] for s in sub] == [70, 80, 90]  # every test2015 question
    sub = json.loads((out / "vizwiz-test" / "vizwiz_test_submission.json").read_text())
    assert [s["image"] for s in sub] == ["VizWiz_test_00000000.jpg"]


def test_evaluate_usage_errors(tiny_hf, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mmjax.evaluate", "--hf", str(tiny_hf),
                        "--benchmark", "gqa", "--data", str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: gqa: ")
    assert "testdev_balanced_questions.json does not exist" in r.stderr


# ---------------------------------------------------------------- lmms-eval adapter


def test_lmms_eval_adapter_against_transformers(tiny_hf):
    """lmms-eval's `mmjax` model (resolved through lmms-eval's own registry, when its API is
    installed): loglikelihood equals transformers' log-probabilities of the same tokens, and
    generate_until transformers' greedy continuation."""
    import numpy as np
    import torch
    import transformers as tf
    from PIL import Image

    from mmjax.evaluation import lmms_adapter
    from mmjax.inference.prompt import request as prompt_request

    try:
        from lmms_eval.api.instance import Instance
        from lmms_eval.api.model import lmms
        from lmms_eval.models import get_model
    except ImportError:  # the adapter's behaviour alone (make test installs lmms-eval's API)
        Instance, lmms = None, None
    if lmms is not None:
        cls = get_model("mmjax")
        assert cls is lmms_adapter.MMJax and issubclass(cls, lmms)
        model = cls.create_from_arg_string(f"hf={tiny_hf},batch_size=2,max_new_tokens=6",
                                           {"device": "cpu"})

        def request(kind, args, i):
            return Instance(request_type=kind, arguments=args, idx=i,
                            metadata={"task": "t", "doc_id": args[3], "repeats": 1})
    else:
        model = lmms_adapter.LmmsModel(hf=str(tiny_hf), batch_size=2, max_new_tokens=6)

        class request:  # noqa: N801 (lmms-eval's Instance: .args)
            def __init__(self, kind, args, i):
                self.args = args

    photos = [Image.open(io) for io in (_photo(1), _photo(2))]
    docs = [{"image": photos[0], "q": "what is in the image?", "a": " yes"},
            {"image": photos[1], "q": "is there a cat?", "a": " no"},
            {"image": None, "q": "say something", "a": " cat dog"}]
    model.task_dict = {"t": {"test": docs}}
    visual = lambda d: [d["image"]] if d["image"] is not None else []  # noqa: E731
    target = lambda d: d["a"]  # noqa: E731
    ll = model.loglikelihood([request("loglikelihood", (d["q"], target, visual, i, "t",
                                                        "test"), i)
                              for i, d in enumerate(docs)])
    gen = model.generate_until([request("generate_until", (d["q"], {"max_new_tokens": 6,
                                                                     "temperature": 0,
                                                                     "until": ["\n\n"]},
                                                           visual, i, "t", "test"), i)
                                for i, d in enumerate(docs)])
    hf = tf.LlavaForConditionalGeneration.from_pretrained(tiny_hf).eval()
    m = model.m
    v = m.cfg.vision
    for d, (logp, greedy), text in zip(docs, ll, gen):
        images = [m.read_image(_save(d["image"]))] if d["image"] is not None else []
        prompt = prompt_request(m, [(d["q"], "")], images).ids
        cont = m.tokenizer.encode(d["a"], add_special_tokens=False)
        ids = torch.tensor(np.concatenate([prompt, cont])[None].astype(np.int64))
        kw = {}
        if images:
            from mmjax.batch import normalize
            px = normalize(images[0], v.image_mean, v.image_std)
            kw["pixel_values"] = torch.tensor(px.transpose(2, 0, 1)[None])
        with torch.no_grad():
            logits = hf(input_ids=ids, **kw).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            want = sum(float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(cont))
            want_greedy = all(int(logits[len(prompt) - 1 + k].argmax()) == t
                              for k, t in enumerate(cont))
            out = hf.generate(input_ids=ids[:, :len(prompt)], max_new_tokens=6,
                              do_sample=False, **kw)
        assert logp == pytest.approx(want, abs=2e-4) and greedy == want_greedy
        hf_text = m.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
        assert text.strip() == hf_text.split("\n\n")[0].strip()
    with pytest.raises(NotImplementedError, match="multi-round"):
        model.generate_until_multi_round([])


def _photo(i):
    import io

    return io.BytesIO(fx.photo(i))


def _save(image):
    import tempfile

    path = Path(tempfile.mkdtemp()) / "x.png"
    image.save(path)
    return path


@pytest.mark.parametrize("text, short, sentence", [
    ("red", True, False), ("left side", True, False), ("The triangles are red.", False, True),
    ("There are two red triangles in the image.", False, True),
    ("The triangles are red", False, False),  # no final period
    ("Red triangles, two of them.", False, False),  # no verb
    ("It is red.", True, False),  # three words: a phrase, not a full sentence
])
def test_answer_form(text, short, sentence):
    assert scoring.is_short(text) is short and scoring.is_sentence(text) is sentence


def test_facts_inside_answers():
    assert scoring.has_facts("Two red circles on the left.", ["circle", "two", "left"])
    assert scoring.has_facts("There are 2 squares.", ["two"])  # digits count as the number
    assert not scoring.has_facts("The shapes are reddish.", ["red", "square"])
    assert not scoring.has_facts("It is tired.", ["red"])  # only at the start of a word
