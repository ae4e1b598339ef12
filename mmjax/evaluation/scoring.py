"""Answer parsing and metrics of the benchmarks besides VQA accuracy (`vqa.py`), each as the
benchmark's own evaluation defines it.

    pope_label       LLaVA `eval_pope.py`: first sentence; "no" / "not" / "No" as a word -> no
    pope_metrics     accuracy, precision, recall, F1 and yes-ratio with "yes" as positive
    mme_label        MME `eval_tool/calculation.py`: "yes" / "no", else the first four
                     characters decide, else "other" (always wrong)
    mme_scores       per subtask accuracy and accuracy+ (both questions of an image right),
                     score = 100 * (acc + acc+); perception and cognition totals
    sqa_letter       LLaVA `eval_science_qa.py`: "B", "B. ...", "The answer is B." (exactly);
                     sqa_letter_lenient: a separate, more lenient reading
    mmbench_letter   MMBench's evaluator (OpenCompass `can_infer`): one of A-E as a word, or
                     in a form such as "(B)", else exactly one option's text in the answer
    average_precision  scikit-learn's average precision (VizWiz's unanswerability)
    relaxed_correct  ChartQA (pix2struct's relaxed_correctness): numbers within 5%, "%" read
                     as /100; text exact after lowercasing
    gqa_prediction   LLaVA `convert_gqa_for_eval.py`: trailing periods off, lowercased
    is_sentence      an answer in a full sentence: more than three words, a verb, a final
                     period; is_short: one to three words and not a sentence (a format
                     prompt's "single word or phrase")
    has_facts        every fact appears in the answer (as the start of a word, so "circle"
                     is in "circles"; numbers as words or digits)
"""
from __future__ import annotations

import re
from collections import defaultdict

from mmjax.evaluation.vqa import normalize_answer

# MME's two halves (calculation.py's eval_type_dict)
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def pope_label(text: str) -> str:
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predicted: list[str], labels: list[str]) -> dict:
    """Binary metrics over "yes" / "no" predictions (already parsed) against labels."""
    tp = sum(p == "yes" and g == "yes" for p, g in zip(predicted, labels))
    fp = sum(p == "yes" and g != "yes" for p, g in zip(predicted, labels))
    tn = sum(p != "yes" and g != "yes" for p, g in zip(predicted, labels))
    fn = sum(p != "yes" and g == "yes" for p, g in zip(predicted, labels))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"accuracy": _ratio(tp + tn, len(labels)), "precision": precision,
            "recall": recall, "f1": _ratio(2 * precision * recall, precision + recall),
            "yes_ratio": _ratio(tp + fp, len(labels)), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def mme_label(text: str) -> str:
    text = text.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def mme_scores(records: list[tuple[str, str, bool]]) -> dict:
    """records: (subtask, image, correct) per question -> per subtask accuracy, accuracy+ and
    score, and the perception / cognition totals (sums of their subtasks' scores)."""
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for task, image, ok in records:
        by_task[task][image].append(ok)
    out: dict = {}
    totals = {"perception": 0.0, "cognition": 0.0}
    for task, images in sorted(by_task.items()):
        answers = [ok for oks in images.values() for ok in oks]
        acc = _ratio(sum(answers), len(answers))
        acc_plus = _ratio(sum(all(oks) for oks in images.values()), len(images))
        score = 100 * (acc + acc_plus)
        out[f"{task}/accuracy"], out[f"{task}/accuracy_plus"] = acc, acc_plus
        out[f"{task}/score"] = score
        if task in MME_PERCEPTION:
            totals["perception"] += score
        elif task in MME_COGNITION:
            totals["cognition"] += score
    out["perception"], out["cognition"] = totals["perception"], totals["cognition"]
    out["total"] = totals["perception"] + totals["cognition"]
    return out


def sqa_parse(text: str, letters: str = "ABCDE") -> str | None:
    """The letter LLaVA's eval_science_qa.py reads in an answer, or None (its FAILED):
    exactly a letter; a letter then ". "; else exactly one match of `The answer is
    ([A-Z]).` (the "." is any character, as there)."""
    if text in tuple(letters):  # one of the letters (LLaVA's list of options), not "" or "AB"
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    matches = re.findall(r"The answer is ([A-Z]).", text)
    return matches[0] if len(matches) == 1 else None


def sqa_letter(text: str, n_choices: int, letters: str = "ABCDE") -> str | None:
    """The option letter of a ScienceQA answer as LLaVA scores it: `sqa_parse`, and only a
    letter among the question's choices (a letter beyond them is its index -1)."""
    found = sqa_parse(text, letters)
    return found if found and found in letters[:n_choices] else None


def sqa_letter_lenient(text: str, n_choices: int, letters: str = "ABCDE") -> str | None:
    """A more lenient reading than LLaVA's (`sqa_letter`): also 'The answer is A' with
    nothing after it, a letter before a newline or after spaces, repeated sentences."""
    text = text.replace("\n", ". ")
    valid = letters[:n_choices]
    found = None
    if text.strip() in tuple(letters):
        found = text.strip()
    elif len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        found = text[0]
    else:
        m = re.search(r"The answer is ([A-E])\.", text) or re.search(r"The answer is ([A-E])",
                                                                     text)
        found = m.group(1) if m else None
    return found if found and found in valid else None


# OpenCompass's MMBench evaluator (`can_infer_option`): prefix / suffix around a letter
_LETTER_FORMS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                 (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))


def mmbench_letter(text: str, options: dict[str, str]) -> str | None:
    """The option of a multiple-choice answer (options: letter -> text) as MMBench's own
    evaluator reads it without a GPT judge (OpenCompass `MMBench_Evaluator.can_infer`, as
    lmms-eval carries it): exactly one of A-E as a word (not when "A" may be a quantifier in
    a longer answer), else exactly one in one of the forms "A." "(A)" ":A" ..., else exactly
    one option's text inside the answer; None when none of these holds (VLMEvalKit's exact
    matching then counts the answer wrong)."""
    words = [w.strip() for w in text.split()]
    letters = "ABCDE"  # the evaluator counts five letters whatever the options

    def count(prefix="", suffix=""):
        return sum(1 for c in letters if prefix + c + suffix in words)

    if count() == 1 and not ("A" in words and len(words) > 3):
        return next(c for c in letters if c in words)
    for prefix, suffix in _LETTER_FORMS:
        if count(prefix, suffix) == 1:
            return next(c for c in letters if prefix + c + suffix in words)
    lowered = text.lower()
    inside = [k for k, v in options.items() if str(v).lower() in lowered]
    return inside[0] if len(inside) == 1 else None


def _number(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def average_precision(labels: list[bool], scores: list[float]) -> float:
    """Average precision of `scores` ranking the positive `labels` first (scikit-learn's
    `average_precision_score`: the sum over the distinct thresholds of the recall gained
    times the precision there); 0 without positives."""
    positives = sum(bool(x) for x in labels)
    if not positives:
        return 0.0
    order = sorted(zip(scores, labels), key=lambda sl: -sl[0])
    ap, tp, seen, last_recall, i = 0.0, 0, 0, 0.0, 0
    while i < len(order):
        j = i
        while j < len(order) and order[j][0] == order[i][0]:  # ties share a threshold
            tp += bool(order[j][1])
            j += 1
        seen = j
        recall = tp / positives
        ap += (recall - last_recall) * (tp / seen)
        last_recall, i = recall, j
    return ap


def relaxed_correct(target: str, prediction: str, tolerance: float = 0.05) -> bool:
    p, t = _number(prediction), _number(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= tolerance
    return prediction.lower() == target.lower()


def gqa_prediction(text: str) -> str:
    return text.rstrip(".").lower()


def mean_by(values: list[float], groups: list[str], prefix: str) -> dict[str, float]:
    """{prefix/group: mean of the values in that group}."""
    acc: dict[str, list[float]] = defaultdict(list)
    for v, g in zip(values, groups):
        acc[g].append(v)
    return {f"{prefix}/{g}": sum(v) / len(v) for g, v in sorted(acc.items())}


VERBS = frozenset("is are was were be has have had shows show showing contains contain "
                  "appears appear sits sit lies lie looks look see seems seem".split())


def is_sentence(text: str) -> bool:
    text = text.strip()
    words = [w.strip(".,;:!?").lower() for w in text.split()]
    return len(words) > 3 and text.endswith(".") and any(w in VERBS for w in words)


def is_short(text: str) -> bool:
    return 1 <= len(text.strip().rstrip(".").split()) <= 3 and not is_sentence(text)


def has_facts(text: str, facts: list[str]) -> bool:
    forms = (text.lower(), normalize_answer(text))
    return all(any(re.search(rf"(?<![a-z0-9]){re.escape(f)}", form)
                   for f in {fact.lower(), normalize_answer(fact)} for form in forms)
               for fact in facts)
