"""VQA answer normalisation and accuracy, as the official evaluations define them.

The tables and steps are those of GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/
vqaEval.py` (the Python 3 version; EvalAI scores VQAv2 test-dev with the same), kept as they
are, quirks included: contraction keys with capitals ("Im", "Ive") never match because the
text is lowercased first; "-" and "!" are punctuation, ":" and "'" are not; the period strip
replaces at most 32 periods (the official call passes re.UNICODE as the count).

    normalize_answer(" Two dogs.")      -> "2 dogs"
    vqa_accuracy("2", ten_answers)      -> min(#matching / 3, 1) over the ten leave-one-out
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


def process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """A prediction as the official evaluation compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The official VQA accuracy of one prediction against the human answers (ten in VQAv2):
    for each answer left out, min(#other answers equal to the prediction / 3, 1); averaged.
    Human answers get the punctuation step only, and only when they are not all the same."""
    pred = normalize_answer(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(1 for a in others if a == pred) / 3))
    return sum(accs) / len(accs) if accs else 0.0


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
