"""mmjax's conversation encoding against LLaVA's own preprocessing (our port of it,
tests/llava_reference.py), on the same conversations and the same tokenizers: token ids and
label masks must be identical wherever LLaVA's own code is self-consistent; where it is not
(its "tokenization mismatch", after which it learns nothing from the sample), mmjax must
learn exactly the replies."""
from __future__ import annotations

import collections

import numpy as np
import pytest
from llava_reference import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    LLAMA3_SYSTEM,
    REFERENCES,
    VICUNA_V1_SYSTEM,
)

from data_fixtures import byte_level_tokenizer, llama_sp_tokenizer
from mmjax.data.templates import (
    CHATML_SYSTEM,
    ConversationError,
    get_template,
    normalize_turns,
)
from mmjax.data.tokenize import ConversationEncoder

IMAGE_TOKENS = 3
IMAGE_ID = 1_000_000  # mmjax's image-token id here: any id outside the vocabulary


def H(value):  # noqa: N802
    return {"from": "human", "value": value}


def G(value):  # noqa: N802
    return {"from": "gpt", "value": value}


CONVERSATIONS = [
    [H("<image>\nWhat color is the cat?"), G("Orange.")],
    [H("What is in the picture? <image>"), G("A cat on a sofa.")],
    [H("Look at this <image> and tell me the breed."), G("It looks like a tabby.")],
    [H("<image>\n\nDescribe the photo.  "), G("A small orange cat sleeps on a blue blanket.")],
    [H("<image> How many cats?"), G("2")],
    [H("  <image>\nIs it day or night?\n"), G("Day.")],
    [H("Which side is the cat on?\n<image>"), G("The left side.")],
    [H("<image>\nHow many legs?"), G("4"), H("And ears?"), G(" 2 ears."),
     H("Write a list."), G("\n- one\n- two")],
    [H("<image>\nQuelle est la couleur du chat ? 🐱"), G("Le chat est orange 🧡 — très mignon.")],
    [H("<image>\n这是什么？"), G("这是一只猫。")],
    [H("Tell me a joke."), G("Why did the cat sit on the computer? To watch the mouse.")],
    [H("What is 12 + 30?"), G("42"), H("And 7 x 6?"), G("Also 42.")],
    [H("<image>\nWhat does the sign say?"), G("It says USER: hello ASSISTANT: hi.")],
    [H("<image>\nRepeat after me: ASSISTANT: ok"), G("ASSISTANT: ok")],
    [H("<image>\nStart your answer with a newline."), G("\nDone.")],
    [H("<image>\nIs there a cat?\nAnswer the question using a single word or phrase."),
     G("Yes")],
    [H("<image>\nWhat is the user role called in a chat?"), G("user, then assistant.")],
]
CAPTIONS = [
    [H("<image>\nDescribe the image concisely."), G("An orange cat on a blue blanket.")],
    [H("Give a brief description. <image>"), G("2 cats, 1 dog.")],
    [H("<image>"), G("  A cat with 🐟 fish. ")],
]
# Sample text that the tokenizer would read as a control token.
SPECIAL_TEXT = {
    "vicuna_v1": [H("<image>\nHow does a Llama turn end?"), G("With </s> after the reply.")],
    "llama_3": [H("What is <|eot_id|> for?"), G("It ends a Llama-3 turn.")],
    "chatml": [H("<image>\nHow does a ChatML turn end?"), G("With <|im_end|> and a newline.")],
}
CORPUS = ([VICUNA_V1_SYSTEM, LLAMA3_SYSTEM, CHATML_SYSTEM, "USER: ASSISTANT: user assistant "
           "system"] * 20
          + [t["value"].replace("<image>", "") for c in CONVERSATIONS + CAPTIONS for t in c] * 5
          + ["The quick brown fox jumps over the lazy dog. 0123456789 cats dogs photo"] * 20)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"llama_sp_nonlegacy": llama_sp_tokenizer(root / "a", CORPUS, legacy=False),
            "llama_sp_legacy": llama_sp_tokenizer(root / "b", CORPUS, legacy=True),
            "byte_level_bpe": byte_level_tokenizer(root / "c", CORPUS)}


def _mmjax(template, tokenizer, source, special_token_text="skip"):
    system, pairs = normalize_turns(source)
    enc = ConversationEncoder(tokenizer, get_template(template, tokenizer), IMAGE_TOKENS,
                              IMAGE_ID, 1 << 20, special_token_text)
    out = enc.encode(system, pairs, sum(t["value"].count("<image>") for t in source))
    ids, labels = [], []
    i = 0
    while i < len(out.input_ids):  # each image's expanded tokens -> LLaVA's one placeholder
        if out.input_ids[i] == IMAGE_ID:
            assert (out.input_ids[i:i + IMAGE_TOKENS] == IMAGE_ID).all()
            assert (out.labels[i:i + IMAGE_TOKENS] == IGNORE_INDEX).all()
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            i += IMAGE_TOKENS
        else:
            ids.append(int(out.input_ids[i]))
            labels.append(int(out.labels[i]))
            i += 1
    return ids, labels


def _learned_text(tokenizer, ids, labels):
    """The learned tokens, decoded run by run."""
    runs, run = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            run.append(i)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    if run:
        runs.append(tokenizer.decode(run))
    return runs


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "llama_3", "chatml"])
def test_token_ids_and_labels_equal_llavas(template, tokenizers):
    samples = CAPTIONS if template == "plain" else CONVERSATIONS
    tally = collections.Counter()
    for tok_name, tok in tokenizers.items():
        for source in samples:
            has_image = any("<image>" in t["value"] for t in source)
            ref_ids, ref_labels, mismatch = REFERENCES[template](source, tok, has_image)
            ids, labels = _mmjax(template, tok, source)
            where = f"{template} / {tok_name} / {source[0]['value']!r}"
            if not mismatch:
                assert ids == ref_ids, where
                assert labels == ref_labels, where
                tally[tok_name, "identical"] += 1
                continue
            # LLaVA learns nothing from this sample; mmjax learns each reply and its end
            assert all(lab == IGNORE_INDEX for lab in ref_labels), where
            tally[tok_name, "llava_mismatch"] += 1
            assert ids == ref_ids or template == "vicuna_v1" and not has_image, where
            learned = _learned_text(tok, ids, labels)
            replies = [t["value"] for t in source if t["from"] == "gpt"]
            assert len(learned) == len(replies), (where, learned)
            for text, reply in zip(learned, replies):
                assert text.strip() == (reply + "</s>").strip(), (where, text)
    print(f"\n{template}: {dict(tally)}")
    for tok_name in tokenizers:  # the comparison really ran on every tokenizer
        assert tally[tok_name, "identical"] + tally[tok_name, "llava_mismatch"] == len(samples)
    if template != "vicuna_v1":
        assert not any(k[1] == "llava_mismatch" for k in tally), tally  # never for these
        return
    # LLaVA-1.5's own arithmetic fails (and it learns nothing) on replies that contain its
    # separator, with every tokenizer; and on multi-turn samples with a non-legacy Llama
    # tokenizer (its "-1 when not legacy" correction) and with byte-level BPE (no BOS)
    quoting = sum(any("ASSISTANT: " in t["value"] for t in s[1::2]) for s in samples)
    multi = sum(len(s) > 2 and not any("ASSISTANT: " in t["value"] for t in s[1::2])
                for s in samples)
    assert tally["llama_sp_legacy", "llava_mismatch"] == quoting, tally
    assert tally["llama_sp_nonlegacy", "llava_mismatch"] == quoting + multi, tally
    assert tally["byte_level_bpe", "llava_mismatch"] == quoting + multi, tally


def test_the_differences_the_issue_found_are_gone(tokenizers):
    """One example each, on the non-legacy Llama tokenizer LLaVA-1.5 is used with today."""
    tok = tokenizers["llama_sp_nonlegacy"]
    src = [H("What is this? <image>"), G("42 cats")]
    ids, labels = _mmjax("vicuna_v1", tok, src)
    text = tok.decode([i for i in ids if i >= 0])
    assert text.startswith("<s> A chat between a curious user and")  # conv_vicuna_v1
    # "<image>\n" becomes image, "▁", "\n" (the piece after an image gets its own "▁")
    k = ids.index(IMAGE_TOKEN_INDEX)
    assert tok.convert_ids_to_tokens(ids[k + 1:k + 3]) == ["▁", "<0x0A>"]
    # the question was moved behind the image and stripped, as LLaVA does
    assert "USER: " in text and "What is this?" in text
    # the separator before a reply that starts with a digit is a token of its own, learned
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert tok.convert_ids_to_tokens(ids[first:first + 2]) == ["▁", "4"]
    # stage 1: the caption after the image starts with its own "▁" ("▁An", not "A n")
    ids, labels = _mmjax("plain", tok, [H("<image>"), G("An orange cat.")])
    assert tok.convert_ids_to_tokens(ids[2:3])[0].startswith("▁")
    assert labels[:2] == [IGNORE_INDEX] * 2 and all(lab != IGNORE_INDEX for lab in labels[2:])


@pytest.mark.parametrize("template", ["vicuna_v1", "llama_3", "chatml"])
def test_text_that_would_become_a_control_token_is_refused_not_trained(template, tokenizers):
    source = SPECIAL_TEXT[template]
    has_image = "<image>" in source[0]["value"]
    for tok in tokenizers.values():
        ref_ids, ref_labels, _ = REFERENCES[template](source, tok, has_image)
        control = {"vicuna_v1": "</s>", "llama_3": "<|eot_id|>", "chatml": "<|im_end|>"}[template]
        control_id = tok.convert_tokens_to_ids(control)
        per_template = {"vicuna_v1": 1, "llama_3": 3, "chatml": 3}[template]
        # LLaVA's code reads the text as the control token itself
        assert ref_ids.count(control_id) == per_template + 1
        with pytest.raises(ConversationError) as err:
            _mmjax(template, tok, source)
        assert err.value.reason == "special_token_text" and control in err.value.detail
        if template != "vicuna_v1":  # asked to keep it, mmjax encodes what LLaVA-NeXT does
            assert _mmjax(template, tok, source, "keep") == (ref_ids, ref_labels)
    with pytest.raises(ConversationError, match="special_token_text"):
        _mmjax(template, tok, [H("<image>\nHi"), G("Here: <image>")])


@pytest.mark.parametrize("template", ["vicuna_v1", "llama_3", "chatml", "plain"])
def test_prompt_ids_are_the_training_ids_up_to_the_reply(template, tokenizers):
    """The public prompt API: exactly the tokens training put before the reply's first
    learned token (for templates that learn a header, before the reply text)."""
    for tok in tokenizers.values():
        enc = ConversationEncoder(tok, get_template(template, tok), IMAGE_TOKENS, IMAGE_ID,
                                  1 << 20)
        source = CAPTIONS[0] if template == "plain" else CONVERSATIONS[7]
        system, pairs = normalize_turns(source)
        full = enc.encode(system, pairs, 1)
        prompt = enc.prompt_ids(system, pairs)
        n = len(prompt)
        assert np.array_equal(full.input_ids[:n], prompt)
        reply = tok.decode(full.input_ids[n:][full.labels[n:] != IGNORE_INDEX])
        assert pairs[-1][1].strip()[:6] in reply


def test_layout_command_prints_the_encoding(tokenizers, tmp_path, capsys):
    from mmjax.data import layout

    tokenizers["llama_sp_nonlegacy"].save_pretrained(str(tmp_path / "tok"))
    out = layout.main(["--tokenizer", str(tmp_path / "tok"), "--template", "vicuna_v1",
                       "--image-tokens", "4"])
    assert "USER: <image>\\nWhat is in the picture? ASSISTANT: 2 cats.</s>" in out
    assert "<image x 4>" in out and "'</s>':2*" in out
    prompt = layout.main(["--tokenizer", str(tmp_path / "tok"), "--prompt"])
    colon = tokenizers["llama_sp_nonlegacy"].convert_tokens_to_ids(":")
    assert prompt.rstrip().endswith(f"':':{colon}")  # ends at "ASSISTANT:", nothing learned
    assert "*" not in prompt.split("learned):", 1)[1]
