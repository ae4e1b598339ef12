"""VQA answer normalisation and accuracy, as the official evaluations define them.

Three scorers, each equal to its reference on every question (tests/test_reference_scores.py
holds the reference's own per-question figures):

- `official_accuracy` (VQAv2's default): GT-Vision-Lab/VQA `PythonEvaluationTools/
  vqaEvaluation/vqaEval.py` as of a013f00 (2021-03-11, "Fixed processing answers bug").
  Newlines, tabs and outer spaces go on both sides; when the ten human answers are not all
  the same, both the prediction and every human answer get the full normalisation
  (punctuation, then number words, articles and contractions); when they are all the same,
  nothing more (so "t-shirt" matches ten "t-shirt", "Yes" does not match ten "yes").
- the LLaVA route (`--variant llava`): the prediction first through EvalAI's answer processor
  (`evalai_normalize`, LLaVA's `convert_vqav2_for_submission.py` and
  `convert_vizwiz_for_submission.py`), then the official scorer, as the evaluation server
  scores LLaVA's upload.
- `vizwiz_accuracy` (VizWiz's default): the VizWiz API's `vqaEval.py` (Qing Li): the
  prediction always fully normalised, with the 2015 contraction table (curly apostrophes,
  `VIZWIZ_CONTRACTIONS`); the human answers compared as they are.

The tables are the official ones, quirks included: contraction keys with capitals ("Im",
"Ive") never match because the text is lowercased first; "-" and "!" are punctuation, ":"
and "'" are not; the period strip replaces at most 32 periods (the official call passes
re.UNICODE as the count).

    normalize_answer(" Two dogs.")      -> "2 dogs"
    official_accuracy("2", ten_answers) -> min(#matching / 3, 1) over the ten leave-one-out
                                           subsets of the human answers, averaged

TextVQA and the submission files of VQAv2 and VizWiz use EvalAI's answer processor (pythia /
MMF's `EvalAIAnswerProcessor`, as LLaVA's `m4c_evaluator.py` carries it): the same tables
after a first pass that lowercases and drops "," and "?" and splits "'s", and the soft score
of each distinct human answer (`soft_scores`) applied to both sides.

Normalisation is for scoring predictions; training targets stay the released answers.
"""
from __future__ import annotations

import re

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
              "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def process_punctuation(text: str, comma_strip: re.Pattern = COMMA_STRIP) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or comma_strip.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=re.UNICODE)


def process_digit_article(text: str, contractions: dict = CONTRACTIONS) -> str:
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(contractions.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """An answer with the official full normalisation (punctuation, number words, articles,
    contractions)."""
    return process_digit_article(process_punctuation(_clean(answer)))


def _leave_one_out(prediction: str, answers: list[str]) -> float:
    """For each human answer left out, min(#other answers equal to the prediction / 3, 1);
    averaged (0 for no answers)."""
    accs = [min(1.0, sum(1 for j, a in enumerate(answers) if j != i and a == prediction) / 3)
            for i in range(len(answers))]
    return sum(accs) / len(accs) if accs else 0.0


def official_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy as GT-Vision-Lab's vqaEval.py (a013f00) scores one prediction: full
    normalisation of both sides only when the human answers are not all the same."""
    pred, gts = _clean(prediction), [_clean(a) for a in answers]
    if len(set(gts)) > 1:
        pred = process_digit_article(process_punctuation(pred))
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
    return _leave_one_out(pred, gts)


def llava_accuracy(prediction: str, answers: list[str]) -> float:
    """LLaVA's route: EvalAI's processor over the prediction, then the official scorer."""
    return official_accuracy(evalai_normalize(prediction), answers)


def _curly(text: str) -> str:
    return text.replace("'", "\u2019")


# The VizWiz API's table: the 2015 vqaEval.py contractions, with curly apostrophes in every
# key and value but these, which that table has with straight ones
_STRAIGHT_VALUES = ("aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove")
_STRAIGHT_KEYS = ("couldn'tve", "hadn'tve")
VIZWIZ_CONTRACTIONS = {
    (k if k in _STRAIGHT_KEYS else _curly(k)): (v if k in _STRAIGHT_VALUES else _curly(v))
    for k, v in CONTRACTIONS.items()}


def vizwiz_normalize(answer: str) -> str:
    """A prediction as the VizWiz API's vqaEval.py compares it."""
    return process_digit_article(process_punctuation(_clean(answer)), VIZWIZ_CONTRACTIONS)


def vizwiz_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy as the VizWiz API scores one prediction: the prediction normalised, the
    human answers as they are."""
    return _leave_one_out(vizwiz_normalize(prediction), list(answers))


def evalai_normalize(answer: str) -> str:
    """An answer as EvalAI's processor writes it (TextVQA scoring, VQAv2 / VizWiz uploads)."""
    answer = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer, EVALAI_COMMA_STRIP))


def soft_scores(answers: list[str]) -> dict[str, float]:
    """The score of each distinct human answer (already normalised): min(#other answers equal
    to it / 3, 1), averaged over leaving each of the answers out."""
    n = len(answers)
    return {u: sum(min(1.0, (answers.count(u) - (a == u)) / 3) for a in answers) / n
            for u in set(answers)}


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
    """TextVQA's accuracy (m4c's TextVQAAccuracyEvaluator): both sides through EvalAI's
    processor, the prediction scored as the human answer it equals."""
    return soft_scores([evalai_normalize(a) for a in answers]).get(
        evalai_normalize(prediction), 0.0)
