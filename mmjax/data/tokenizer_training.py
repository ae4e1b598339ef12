"""Training a small byte-level BPE tokenizer and saving it as a Hugging Face tokenizer dir.

Used by tests and the embedded demo, which must not download one; the saved directory loads
through `transformers.AutoTokenizer` exactly like a real checkpoint's tokenizer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                        extra_special_tokens: tuple[str, ...] = ("<image>",)):
    """Trains byte-level BPE on `texts`, saves it to `out_dir`, returns the HF tokenizer."""
    # start-up cost (transformers): tests and the demo only
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIALS.values()) + list(extra_special_tokens)
    tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS,
                                 additional_special_tokens=list(extra_special_tokens))
    hf.save_pretrained(str(out_dir))
    return hf
