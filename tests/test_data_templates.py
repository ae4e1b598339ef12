"""Token/label layouts for each template, written out by hand with a real (locally made)
word-level HF tokenizer so that they read as documentation; mismatch detection and
truncation. (Equality with LLaVA's own preprocessing: tests/test_llava_encoding.py.)"""
import pytest

from data_fixtures import CORPUS, bpe_tokenizer, conv, word_tokenizer
from mmjax.data.templates import ConversationError, get_template, normalize_turns
from mmjax.data.tokenize import ConversationEncoder

IMG = 999  # the model's image token id in these tests


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"), CORPUS)


def layout(tok, template, conversation, images=1, image_tokens=2, max_length=512):
    enc = ConversationEncoder(tok, get_template(template, tok), image_tokens, IMG, max_length)
    system, pairs = normalize_turns(conversation)
    e = enc.encode(system, pairs, images)
    out = []
    for i, label in zip(e.input_ids.tolist(), e.labels.tolist()):
        name = "IMG" if i == IMG else tok.convert_ids_to_tokens(i)
        assert label in (-100, i)
        out.append(name + ("*" if label != -100 else ""))
    return " ".join(out), e


TWO_TURNS = conv("What animal is this?\n<image>", "A cat.", "What colour is it?", "Brown.")




def test_plain_layout(tok):
    text, _ = layout(tok, "plain", conv("<image>\n", "An astronaut."))
    assert text == "IMG IMG An* astronaut* .*"


def test_vicuna_v1_layout(tok):
    text, _ = layout(tok, "vicuna_v1", TWO_TURNS)
    system = ("A chat between a curious user and an artificial intelligence assistant . The "
              "assistant gives helpful , detailed , and polite answers to the user ' s "
              "questions .")
    assert text == (f"{system} USER : IMG IMG What animal is this ? ASSISTANT : A* cat* .* </s>* "
                    "USER : What colour is it ? ASSISTANT : Brown* .* </s>*")


def test_mistral_instruct_layout(tmp_path):
    tok = word_tokenizer(tmp_path, CORPUS + ["[INST] [/INST]"])
    text, _ = layout(tok, "mistral_instruct", TWO_TURNS)
    # LLaVA-NeXT conv_mistral_instruct: "[INST] q [/INST] a </s>" per round, no system;
    # <image> moved to the front only when the question does not start with it
    assert text == ("[ INST ] IMG IMG What animal is this ? [ / INST ] A* cat* .* </s>* "
                    "[ INST ] What colour is it ? [ / INST ] Brown* .* </s>*")


def test_llama_3_layout(tok):
    text, _ = layout(tok, "llama_3", conv("<image>\nWhat is in the picture?", "An astronaut."))
    system = ("You are a helpful language and vision assistant . You are able to understand the "
              "visual content that the user provides , and assist the user with a variety of "
              "tasks using natural language .")
    # LLaVA-NeXT: the assistant message is learned whole, header included; the header and
    # end-of-turn tokens are learned everywhere; the chat template starts with bos_token
    h = "<|start_header_id|>* {} <|end_header_id|>*"
    assert text == (f"<s> {h.format('system')} {system} <|eot_id|>* "
                    f"{h.format('user')} IMG IMG What is in the picture ? <|eot_id|>* "
                    f"{h.format('assistant*')} An* astronaut* .* <|eot_id|>*")


def test_chatml_layout(tok):
    text, _ = layout(tok, "chatml", TWO_TURNS)
    # LLaVA-NeXT: assistant messages learned whole, <|im_start|> / <|im_end|> everywhere
    # (and newline tokens, which this word-level tokenizer does not have)
    assert text == ("<|im_start|>* system You are a helpful assistant . <|im_end|>* "
                    "<|im_start|>* user IMG IMG What animal is this ? <|im_end|>* "
                    "<|im_start|>* assistant* A* cat* .* <|im_end|>* "
                    "<|im_start|>* user What colour is it ? <|im_end|>* "
                    "<|im_start|>* assistant* Brown* .* <|im_end|>*")


def test_tokenizer_chat_template_layout(tok):
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                         "assistant\n{% endif %}")
    text, _ = layout(tok, "chat_template", TWO_TURNS)
    assert text == ("<|im_start|> user IMG IMG What animal is this ? <|im_end|> "
                    "<|im_start|> assistant A* cat* .* <|im_end|>* "
                    "<|im_start|> user What colour is it ? <|im_end|> "
                    "<|im_start|> assistant Brown* .* <|im_end|>*")


def test_chat_template_that_rewrites_its_prompt_is_a_mismatch(tok):
    # renders the generation prompt differently from the finished turn
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant says:{% endif %}")
    with pytest.raises(ConversationError, match="tokenization_mismatch"):
        layout(tok, "chat_template", TWO_TURNS)


def test_merges_across_reply_boundary_are_caught(tmp_path):
    """A tokenizer that merges across the space before the reply (as SentencePiece models
    without pre-tokenization can) must not get a silently shifted mask."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.train_from_iterator(["USER: Hi ASSISTANT: Yes</s>"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>", "<image>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    enc = ConversationEncoder(tok, get_template("vicuna_v1"), 2, IMG, 512)
    with pytest.raises(ConversationError, match="tokenization_mismatch"):
        enc.encode("", [("Hi", "Yes")], 0)


def test_template_end_of_turn_must_be_one_token(tmp_path):
    from mmjax.data.tokenizer_training import train_bpe_tokenizer

    plain_bpe = train_bpe_tokenizer(CORPUS, 300, tmp_path, extra_special_tokens=("<image>",))
    with pytest.raises(ValueError, match="<\\|im_end\\|>.*one token"):
        ConversationEncoder(plain_bpe, get_template("chatml"), 2, IMG, 512)


def test_byte_level_bpe_masks_exactly(tmp_path):
    tok = bpe_tokenizer(tmp_path, CORPUS * 4, 400)
    _, e = layout(tok, "vicuna_v1", TWO_TURNS)
    learned = [tok.convert_ids_to_tokens(int(i)) for i, lab in zip(e.input_ids, e.labels)
               if lab != -100]
    # "ĠA" carries the space before the reply; a bare "Ġ" separator (before "Bro") is
    # learned too, as LLaVA learns it
    assert learned == ["ĠA", "Ġc", "at", ".", "</s>", "Ġ", "Bro", "w", "n", ".", "</s>"]


def test_truncation_drops_later_turns_never_image_tokens(tok):
    conversation = conv("<image>\nWhat animal is this?", "A cat.", "What colour is it?",
                        "Brown.", "What is two plus two?", "Four.")
    full, e_full = layout(tok, "chatml", conversation, image_tokens=8)
    limit = len(e_full.input_ids) - 5
    text, e = layout(tok, "chatml", conversation, image_tokens=8, max_length=limit)
    assert e.dropped_turns == 1 and len(e.input_ids) <= limit
    assert text.count("IMG") == 8 and "Brown* .* <|im_end|>*" in text and "Four" not in text
    with pytest.raises(ConversationError, match="too_long"):
        layout(tok, "chatml", conversation, image_tokens=8, max_length=20)


def test_image_count_must_match_placeholders(tok):
    with pytest.raises(ConversationError, match="image_count_mismatch"):
        layout(tok, "vicuna_v1", TWO_TURNS, images=2)


@pytest.mark.parametrize("turns, reason", [
    ([{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yes."}], "unknown_role"),
    ([{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Yes."}],
     "turns_not_alternating"),
    ([{"from": "human", "value": "Hi"}], "turns_not_alternating"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}], "empty_reply"),
    ([{"from": "human"}], "malformed_record"),
    ("not a list", "malformed_record"),
])
def test_bad_conversations(turns, reason):
    with pytest.raises(ConversationError, match=reason):
        normalize_turns(turns)
