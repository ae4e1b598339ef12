"""VQA answer normalisation and accuracy against the official evaluation (GT-Vision-Lab/VQA
vqaEval.py): expected values worked out by hand, for every rule and every contraction class,
quirks included (the script's own outputs on these: tests/test_reference_scores.py)."""
import pytest

from mmjax.evaluation import vqa

CASES = [
    # numbers, articles, periods
    ("Two.", "2"), ("a dog", "dog"), ("yes.", "yes"), ("3.5", "3.5"), ("2.5.", "2.5"),
    ("the beatles", "beatles"), ("One dog", "1 dog"), ("an apple", "apple"), ("none", "0"),
    ("ten", "10"), ("eleven", "eleven"), ("mr. smith", "mr smith"), ("u.s.a.", "usa"),
    ("  Two  dogs \n", "2 dogs"), ("Yes\tno", "yes no"), ("The Cat!", "cat"),
    # punctuation: removed next to a space or with a digit comma, else a space
    ("t-shirt", "t shirt"), ("hello, world", "hello world"), ("x,y", "x y"),
    ("a,b", "b"),  # "a" becomes a word of its own, then an article
    ("10,000", "10000"), ("1,2", "12"), ("yes!", "yes"), ("(left)", "left"),
    ("cat/dog", "cat dog"), ("cat / dog", "cat dog"), ("e-mail, fax", "e mail fax"),
    ('"quoted"', "quoted"), ("x_y", "x y"), ("x+y=z", "x y z"), ("@home", "home"),
    ("#1", "#1"), ("50%", "50%"), ("it's", "it's"),
    # contractions: missing apostrophe, 've forms, names, quirks of the official table
    ("dont", "don't"), ("doesnt", "doesn't"), ("cant", "can't"), ("wont", "won't"),
    ("isnt", "isn't"), ("whats", "what's"), ("wheres", "where's"), ("whos", "who's"),
    ("oclock", "o'clock"), ("maam", "ma'am"), ("yall", "y'all"), ("theyll", "they'll"),
    ("wouldve", "would've"), ("shouldve", "should've"), ("hed", "he'd"), ("twas", "'twas"),
    ("couldn'tve", "couldn't've"), ("it'dve", "it'd've"), ("y'allll", "y'all'll"),
    ("somebodys", "somebody's"), ("'ows'at", "'ow's'at"), ("she's", "she's"),
    ("somebody'd", "somebodyd"),  # the official table maps it this way round
    ("Im", "im"), ("Ive", "ive"), ("lets", "lets"),  # capitalised keys never match
]


@pytest.mark.parametrize("answer, expected", CASES)
def test_normalize_answer_follows_the_official_script(answer, expected):
    assert vqa.normalize_answer(answer) == expected


def test_every_official_contraction_is_there():
    assert len(vqa.CONTRACTIONS) == 120 and len(CASES) >= 40
    for key, value in vqa.CONTRACTIONS.items():
        if key == key.lower() and "'" not in key:
            assert vqa.normalize_answer(key) == value


def test_vqa_accuracy_leave_one_out():
    """GT-Vision-Lab's vqaEval.py since 2021: both sides fully normalised when the human
    answers disagree, neither when they all agree (tests/test_reference_scores.py checks
    every case against the script's own figures)."""
    assert vqa.official_accuracy("two", ["2"] * 10) == 0.0  # agreeing humans: as written
    assert vqa.official_accuracy("yes.", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa.official_accuracy("a dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)
    assert vqa.official_accuracy("red", ["red"] * 5 + ["blue"] * 5) == 1.0  # a tie counts
    assert vqa.official_accuracy("green", ["red"] * 5 + ["blue"] * 5) == 0.0
    assert vqa.official_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.9 * 1 / 3)
    assert vqa.official_accuracy("t-shirt", ["t-shirt"] * 4 + ["shirt"] * 6) == 1.0
    assert vqa.official_accuracy("t-shirt", ["t-shirt"] * 10) == 1.0
    # LLaVA's route: EvalAI's processor on the prediction first
    assert vqa.llava_accuracy("Two", ["2"] * 10) == 1.0
