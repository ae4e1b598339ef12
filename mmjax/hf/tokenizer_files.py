"""A tokenizer's files: read through transformers, written so that they read back the same.

transformers 5's `LlamaTokenizer` builds its pre-tokenizer from its `legacy` flag when it
loads, not from `tokenizer.json`, and `save_pretrained` does not write that flag: a
`legacy=True` tokenizer (a "▁" after every special token, as Llama-2 / Vicuna's slow
tokenizer did) comes back as `legacy=False` and tokenizes text after `</s>` or `<image>`
differently. `save_tokenizer` writes the flag and then reads the files back and compares
the ids on probe texts, so a tokenizer that would not come back the same is an error at
save time, not a silent change of the ids a model sees.
"""
from __future__ import annotations

import json
from pathlib import Path

from mmjax.errors import ConfigError
from mmjax.hf.weight_files import CheckpointError

CONFIG = "tokenizer_config.json"


def load_tokenizer(directory: str | Path):
    """The checkpoint's tokenizer through transformers' AutoTokenizer (no remote code)."""
    from transformers import AutoTokenizer  # start-up cost (0.7 s): only when loading one

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"tokenizer directory {directory} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False,
                                             local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: no usable tokenizer files: {e}") from e


def probe_texts(tokenizer) -> list[str]:
    """Texts whose ids show how a tokenizer treats spaces, newlines and the text around its
    special tokens (where legacy and non-legacy sentencepiece tokenizers differ)."""
    specials = [t for t in tokenizer.all_special_tokens if t] or ["</s>"]
    texts = ["Hello world.", " leading space", "two  spaces\nand a newline\n\nend ",
             "digits 12345 and ünïcödé"]
    for s in specials:
        texts += [f"{s}after", f"before{s}", f"a {s} b", f"{s}\nnext line", f"{s} USER: hi"]
    return texts


def same_tokenization(a, b) -> str | None:
    """None when tokenizers `a` and `b` give the same ids on the probe texts, else the first
    text that differs, with both ids."""
    for text in probe_texts(a):
        ia, ib = a.encode(text), b.encode(text)
        if list(ia) != list(ib):
            return f"{text!r}: {list(ia)} before saving, {list(ib)} read back"
    return None


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """`save_pretrained`, the `legacy` flag written, then read back and compared: raises
    ConfigError when the files would tokenize differently from `tokenizer`."""
    tokenizer.save_pretrained(str(directory))
    check_written(tokenizer, directory)


def check_written(tokenizer, directory: str | Path) -> None:
    """After `tokenizer` (or a processor holding it) was saved to `directory`: writes the
    `legacy` flag, reads the files back and compares (ConfigError when they differ)."""
    directory = Path(directory)
    legacy = getattr(tokenizer, "legacy", None)
    config_path = directory / CONFIG
    if isinstance(legacy, bool) and config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.get("legacy") != legacy:
            config["legacy"] = legacy
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    diff = same_tokenization(tokenizer, load_tokenizer(directory))
    if diff:
        raise ConfigError(f"the tokenizer written to {directory} does not read back the same "
                          f"({type(tokenizer).__name__}): {diff}")
