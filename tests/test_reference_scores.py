"""mmjax's scores equal the reference scorers', question by question.

The references, and how each is run here:

- Installed from the package registry and run in these tests as they are: lmms-eval's copies
  of EvalAI's answer processor (`tasks/_task_utils/vqa_eval_metric.py`, which this project
  checked equal to LLaVA's `llava/eval/m4c_evaluator.py` on every string below), of
  OpenCompass's MMBench evaluator (`tasks/mmbench/mmbench_evals.py`: `can_infer`) and of
  ChartQA's relaxed accuracy (`tasks/chartqa/utils.py`: `relaxed_correctness`, Qwen-VL's /
  pix2struct's definition); scikit-learn's `average_precision_score` and `f1_score` (what
  the VizWiz API computes unanswerability with).
- Scorers that no registry package carries (GT-Vision-Lab's current vqaEval.py, the VizWiz
  API, LLaVA's eval scripts, MME's calculation.py, LLaVA's GQA converter): their own outputs
  on the fixtures in tests/data, computed by running that code unmodified (Python 3 print
  calls only) and kept in tests/data/reference_scores.json with the commit each came from
  ("provenance"). Public code fetched for reference is not committed to this repository, so
  its figures are, not the code.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from sklearn.metrics import average_precision_score, f1_score

from mmjax.evaluation import benchmarks as B
from mmjax.evaluation import scoring, vqa

DATA = Path(__file__).resolve().parent / "data"
GOLD = json.loads((DATA / "reference_scores.json").read_text())
VQA = json.loads((DATA / "vqa_cases.json").read_text())


def _lmms(relative: str):
    """A module file of the installed lmms-eval, loaded on its own (its task package's
    __init__ pulls in the datasets stack, which `make test` does not install)."""
    spec = importlib.util.find_spec("lmms_eval")
    assert spec is not None, "lmms-eval's package is a test dependency (make test installs it)"
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _pct(x: float) -> float:
    return round(100 * x, 2)  # the VQA and VizWiz scripts report percentages to 2 places


def _vqa_items():
    return [B.Item(c["question_id"], "q", None,
                   {"answers": c["answers"], "answer_type": c["answer_type"],
                    "answerable": c["answerable"]}) for c in VQA]


# --------------------------------------------------------------------------- VQA family

@pytest.mark.parametrize("variant, scorer", [("official", vqa.official_accuracy),
                                             ("llava", vqa.llava_accuracy)])
def test_vqav2_equals_the_official_script_per_question(variant, scorer):
    gold = GOLD[f"vqav2_{variant}"]
    for c in VQA:
        assert _pct(scorer(c["prediction"], c["answers"])) == \
            gold["per_question"][str(c["question_id"])], (variant, c["prediction"], c["answers"])
    bench = B.VQAv2(DATA, variant=variant)
    scores = bench.score(_vqa_items(), [c["prediction"] for c in VQA])
    assert _pct(scores["accuracy"]) == gold["overall"]
    for answer_type, value in gold["per_answer_type"].items():
        assert _pct(scores[f"accuracy/{answer_type}"]) == value


def test_the_issues_examples_score_as_the_official_script_does():
    by_prediction = {c["prediction"]: c for c in VQA[:4]}
    expected = {"a dog": 100.0, "2": 100.0, "t-shirt": 100.0, "two": 0.0}
    for pred, value in expected.items():
        c = by_prediction[pred]
        assert _pct(vqa.official_accuracy(pred, c["answers"])) == value
        assert GOLD["vqav2_official"]["per_question"][str(c["question_id"])] == value


def test_evalai_processor_equals_llava_and_lmms_eval():
    processor = _lmms("tasks/_task_utils/vqa_eval_metric.py").EvalAIAnswerProcessor()
    strings = {c["prediction"] for c in VQA} | {a for c in VQA for a in c["answers"]}
    for text in sorted(strings):
        assert vqa.evalai_normalize(text) == processor(text), text
    for c in VQA:  # LLaVA's m4c_evaluator (the goldens) on the predictions
        assert vqa.evalai_normalize(c["prediction"]) == \
            GOLD["evalai_processed"][str(c["question_id"])]


def test_normalisation_equals_the_official_script():
    for text, expected in GOLD["normalize"].items():
        assert vqa.normalize_answer(text) == expected, text


@pytest.mark.parametrize("variant", ["official", "llava"])
def test_vizwiz_equals_the_vizwiz_api_per_question(variant):
    gold = GOLD[f"vizwiz_{variant}"]
    texts = [c["prediction"] for c in VQA]
    scored = [vqa.evalai_normalize(t) for t in texts] if variant == "llava" else texts
    for c, t in zip(VQA, scored):
        assert _pct(vqa.vizwiz_accuracy(t, c["answers"])) == \
            gold["per_question"][str(c["question_id"])], (variant, t)
    scores = B.VizWiz(DATA, split="val", variant=variant).score(_vqa_items(), texts)
    assert _pct(scores["accuracy"]) == gold["overall"]
    for answer_type, value in gold["per_answer_type"].items():
        assert _pct(scores[f"accuracy/{answer_type}"]) == value
    assert _pct(scores["unanswerable/average_precision"]) == \
        gold["unanswerability"]["average_precision"]
    assert _pct(scores["unanswerable/f1"]) == gold["unanswerability"]["f1_score"]


def test_unanswerability_metrics_equal_scikit_learn():
    """The VizWiz API's unanswerability figures are scikit-learn's on 1 - answerable;
    mmjax's own average precision and F1 equal them, ties and empty sets included."""
    import numpy as np

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50):
        for _ in range(20):
            labels = rng.integers(0, 2, n).astype(bool)
            scores = rng.integers(0, 3, n) / 2.0  # ties
            if labels.any():
                assert scoring.average_precision(list(labels), list(scores)) == \
                    pytest.approx(average_precision_score(labels, scores), abs=1e-12)
            preds = scores > 0.5
            m = scoring.pope_metrics(["yes" if p else "no" for p in preds],
                                     ["yes" if x else "no" for x in labels])
            assert m["f1"] == pytest.approx(f1_score(labels, preds, zero_division=0.0))
    assert scoring.average_precision([False, False], [1.0, 0.0]) == 0.0


def test_textvqa_equals_llavas_m4c_evaluator():
    for c in VQA:
        assert vqa.textvqa_accuracy(c["prediction"], c["answers"]) == pytest.approx(
            GOLD["textvqa"]["per_question"][str(c["question_id"])], abs=1e-12)


# --------------------------------------------------------------------------- letters

SQA = json.loads((DATA / "sqa_cases.json").read_text())


def test_scienceqa_equals_llavas_eval_science_qa():
    gold = GOLD["scienceqa"]
    for c in SQA:
        letter = scoring.sqa_letter(c["prediction"], len(c["choices"]))
        parsed = gold["parsed"][c["pid"]]
        # LLaVA keeps the parsed letter even when it is beyond the choices (its index -1)
        expected = parsed if parsed != "FAILED" and gold["pred_idx"][c["pid"]] >= 0 else None
        assert letter == expected, c["prediction"]
    items = [B.Item(c["pid"], "q", None, {"answer": c["answer"], "n": len(c["choices"]),
                                          "image": c["image"]}) for c in SQA]
    scores = B.ScienceQA(DATA, variant="all").score(items, [c["prediction"] for c in SQA])
    assert 100 * scores["accuracy"] == pytest.approx(gold["accuracy"], abs=1e-9)
    assert round(100 * scores["img_accuracy"], 2) == gold["img_accuracy_printed"]
    assert scores["unparsed"] == sum(v == "FAILED" for v in gold["parsed"].values())
    # the lenient reading is a separate figure, and reads more
    assert scores["lenient_accuracy"] > scores["accuracy"]


MMBENCH_ANSWERS = [
    "A", "B", "C.", "(D)", "A. cat", "The answer is B", "B is the answer.", "A cat is shown",
    "a dog", "dog", "cat", "It is a cat or a dog", "E", "Option C: bird", ":C", "(A).", "B)",
    "A and B", "fish.", "none of these", "", "I think C, definitely C", "D. Fish", "bird",
    "The cat", "A A", "Answer: A", "C, the bird", "I cannot tell.", "A bird, not a dog",
]
OPTIONS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


def test_mmbench_letters_equal_mmbenchs_own_evaluator():
    evaluator = _lmms("tasks/mmbench/mmbench_evals.py").MMBench_Evaluator()
    for text in MMBENCH_ANSWERS:
        for options in (OPTIONS, {"A": "yes", "B": "no"}):
            ref = evaluator.can_infer(text, dict(options)) or None
            assert scoring.mmbench_letter(text, options) == ref, (text, options)


def test_mmbench_circular_needs_every_rotation_and_names_the_unmatched():
    # one question, four rotations of its options: right only when all four are
    items = []
    for r in range(4):
        opts = list(OPTIONS.values())[r:] + list(OPTIONS.values())[:r]
        items.append(B.Item(7, "q", None, {"index": 7, "options": opts, "round": r,
                                           "answer": "dog", "category": "c", "l2": "l"},
                            {"round_id": r}))
    right = ["B", "A", "D", "C"]  # where "dog" lands in each rotation
    bench = B.MMBench(DATA)
    assert bench.score(items, right)["accuracy"] == 1.0
    assert bench.score(items, right[:3] + ["I cannot tell."]) == {
        **bench.score(items, right[:3] + ["I cannot tell."]), "accuracy": 0.0, "unmatched": 1}
    assert bench.score(items, ["dog"] * 4)["accuracy"] == 1.0  # the option's text


def test_chartqa_relaxed_accuracy_equals_the_reference():
    relaxed = _lmms("tasks/chartqa/utils.py").relaxed_correctness
    pairs = [("12", "12"), ("12.5", "12"), ("12.7", "12"), ("0.125", "12.5%"), ("12.5%", "0.125"),
             ("1,000", "1000"), ("Yes", "yes"), ("yes ", "yes"), ("-5", "-5.2"), ("0", "0"),
             ("0.0", "0"), ("3%", "3"), ("nan", "nan"), ("inf", "1e400"), ("1e3", "1000"),
             ("Blue", "blue"), ("2019", "2018"), ("", "0"), ("50 %", "50%"), ("7", "6.7")]
    for prediction, target in pairs:
        assert scoring.relaxed_correct(target, prediction) == relaxed(prediction, target), \
            (prediction, target)


# --------------------------------------------------------------------------- the rest

def test_pope_equals_llavas_eval_pope():
    cases = json.loads((DATA / "pope_cases.json").read_text())
    items, texts = [], []
    for cat, pairs in cases.items():
        for i, (pred, label) in enumerate(pairs):
            items.append(B.Item(f"{cat}/{i}", "q", None, {"label": label, "category": cat}))
            texts.append(pred)
    scores = B.POPE(DATA).score(items, texts)
    for cat, metrics in GOLD["pope"].items():
        for k, v in metrics.items():
            assert scores[f"{cat}/{k}"] == pytest.approx(v, abs=1e-12), (cat, k)


def test_mme_equals_its_calculation_script():
    cases = json.loads((DATA / "mme_cases.json").read_text())
    items, texts = [], []
    for task, images in cases.items():
        for k, pair in enumerate(images):
            for j, (gt, pred) in enumerate(pair):
                items.append(B.Item(f"{task}/{k}/{j}", "q", None,
                                    {"answer": gt.lower(), "task": task, "image": f"img{k}"}))
                texts.append(pred)
    scores = B.MME(DATA).score(items, texts)
    for task, m in GOLD["mme"].items():
        assert scores[f"{task}/accuracy"] == pytest.approx(m["acc"], abs=1e-12)
        assert scores[f"{task}/accuracy_plus"] == pytest.approx(m["acc_plus"], abs=1e-12)
        assert scores[f"{task}/score"] == pytest.approx(m["score"], abs=1e-9)


def test_gqa_equals_llavas_conversion_and_gqas_accuracy():
    cases = json.loads((DATA / "gqa_cases.json").read_text())
    items = [B.Item(str(i), "q", None, {"answer": a, "structural": s, "semantic": m})
             for i, (_, a, s, m) in enumerate(cases)]
    texts = [p for p, *_ in cases]
    for i, t in enumerate(texts):
        assert scoring.gqa_prediction(t) == GOLD["gqa"]["predictions"][str(i)]
    scores = B.GQA(DATA).score(items, texts)
    correct = GOLD["gqa"]["correct"]
    assert scores["accuracy"] == pytest.approx(sum(correct.values()) / len(correct))
