"""Real files for data tests: photos (scikit-image's), LLaVA JSON with every bad kind, and
locally made Hugging Face tokenizers (word-level, for hand-written expectations, and BPE)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|eot_id|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>", "<|im_end|>"]


def word_tokenizer(out_dir, corpus: list[str]):
    """A WordLevel tokenizer (words and punctuation) saved as an HF tokenizer dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in corpus for w in re.findall(r"\w+|[^\w\s]", text)})
    vocab = {t: i for i, t in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>", pad_token="<pad>",
                                 additional_special_tokens=SPECIALS[4:])
    hf.save_pretrained(str(out_dir))
    return hf


def bpe_tokenizer(out_dir, corpus: list[str], vocab_size: int = 400):
    from mmjax.data.tokenizer_training import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus, vocab_size, out_dir,
                               extra_special_tokens=tuple(SPECIALS[4:]))


def write_photos(root: Path, size=(64, 48)) -> list[str]:
    """Real photos as JPEG/PNG files under root/coco/, returns their relative paths."""
    from skimage import data

    (root / "coco").mkdir(parents=True, exist_ok=True)
    names = []
    for name, arr in [("astronaut.jpg", data.astronaut()), ("chelsea.jpg", data.chelsea()),
                      ("coffee.png", data.coffee()), ("rocket.jpg", data.rocket())]:
        Image.fromarray(arr).resize(size).save(root / "coco" / name)
        names.append(f"coco/{name}")
    return names


def conv(*turns):
    roles = ["human", "gpt"]
    return [{"from": roles[i % 2], "value": t} for i, t in enumerate(turns)]


def good_records(photos: list[str]) -> list[dict]:
    return [
        {"id": "single", "image": photos[0],
         "conversations": conv("<image>\nWhat is in the picture?", "An astronaut.")},
        {"id": "multi_turn", "image": photos[1],
         "conversations": conv("What animal is this?\n<image>", "A cat.",
                               "What colour is it? Answer the question using a single word "
                               "or phrase.", "Brown.")},
        {"id": "two_images", "image": [photos[2], photos[3]],
         "conversations": conv("<image>\n<image>\nWhat differs?", "A cup and a rocket.")},
        {"id": "text_only", "conversations": conv("What is two plus two?", "Four.")},
    ]


def bad_records(root: Path, photos: list[str]) -> list[dict]:
    """One record of each bad kind, writing the bad files they need under root."""
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    jpeg = (root / photos[0]).read_bytes()
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (bad / "garbage.jpg").write_bytes(b"this is not an image at all")
    (bad / "empty.jpg").write_bytes(b"")
    Image.new("L", (9000, 9000)).save(bad / "bomb.png", optimize=True)  # 81 MPixel
    outside = root.parent / "outside.jpg"
    outside.write_bytes(jpeg)
    if not (bad / "link.jpg").exists():
        os.symlink(outside, bad / "link.jpg")
    ok = conv("<image>\nDescribe it.", "A thing.")
    return [
        {"id": "bad_missing", "image": "coco/nope.jpg", "conversations": ok},
        {"id": "bad_truncated", "image": "bad/truncated.jpg", "conversations": ok},
        {"id": "bad_garbage", "image": "bad/garbage.jpg", "conversations": ok},
        {"id": "bad_empty", "image": "bad/empty.jpg", "conversations": ok},
        {"id": "bad_bomb", "image": "bad/bomb.png", "conversations": ok},
        {"id": "bad_dotdot", "image": "../outside.jpg", "conversations": ok},
        {"id": "bad_absolute", "image": str(outside), "conversations": ok},
        {"id": "bad_symlink", "image": "bad/link.jpg", "conversations": ok},
        {"id": "bad_role", "image": photos[0],
         "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "robot",
                                                                       "value": "Hello."}]},
        {"id": "bad_alternation", "image": photos[0],
         "conversations": [{"from": "human", "value": "<image>\nHi"},
                           {"from": "human", "value": "Again?"}]},
        {"id": "bad_image_count", "image": [photos[0], photos[1]], "conversations": ok},
        {"id": "bad_empty_reply", "image": photos[0],
         "conversations": conv("<image>\nDescribe it.", "   ")},
        {"id": "bad_too_long", "image": photos[0],
         "conversations": conv("<image>\n" + "very " * 400 + "long?", "Yes.")},
    ]


MALFORMED_LINE = '{"id": "bad_json", "image": "coco/astronaut.jpg", "conversations": [ '


def write_llava_json(path: Path, records: list[dict], jsonl: bool = False,
                     malformed_line: bool = False) -> Path:
    if jsonl:
        lines = [json.dumps(r) for r in records]
        if malformed_line:
            lines.insert(len(lines) // 2, MALFORMED_LINE)
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions.",
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using "
    "natural language.", "You are a helpful assistant.",
    "USER: ASSISTANT: system user assistant What is in the picture? An astronaut.",
    "What animal is this? A cat. What colour is it? Answer the question using a single word "
    "or phrase. Brown. What differs? A cup and a rocket. What is two plus two? Four.",
    "Describe it. A thing. Hi Hello. Again? very long? Yes.",
]


CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>"]


def llama_sp_tokenizer(out_dir: Path, corpus: list[str], legacy: bool, vocab_size: int = 600):
    """A Llama-style tokenizer: sentencepiece BPE with byte fallback and split digits,
    trained here, saved as `tokenizer.model` + `tokenizer_config.json` (how Llama-2 / Vicuna
    ship it) and loaded through AutoTokenizer with `legacy` as given; plus the chat
    templates' special tokens (added, as a Llama-3 / Qwen2 vocabulary has them)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # no newline in the vocabulary: it is the byte <0x0A>, as in Llama's
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t.replace("\n", " ") for t in corpus),
        model_prefix=str(out_dir / "sp"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, split_digits=True,
        add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (out_dir / "sp.model").rename(out_dir / "tokenizer.model")
    (out_dir / "sp.vocab").unlink()
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": True,
        "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 4096}))
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    tok.add_special_tokens({"additional_special_tokens": CHAT_SPECIALS})
    return tok


def byte_level_tokenizer(out_dir: Path, corpus: list[str], vocab_size: int = 600):
    """A byte-level BPE (GPT-2 / Qwen2 / Llama-3 style: no dummy prefix, no BOS added)."""
    from mmjax.data.tokenizer_training import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus, vocab_size, out_dir,
                               extra_special_tokens=tuple(CHAT_SPECIALS))
