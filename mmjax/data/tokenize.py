"""Conversation -> token ids and labels, with image placeholders expanded.

Labels are -100 everywhere except on assistant replies and their end-of-turn token. They
come from character spans (`templates.Rendered.targets`) through the tokenizer's offsets, so
the mask is exact by construction; a token that straddles a span boundary, or a span that no
token covers, is a "tokenization mismatch" (the bug that silently zeroes LLaVA's loss on whole
samples) and the sample is refused, counted, instead of trained on.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.data.templates import IMAGE, ConversationError, Template

IGNORE = -100


@dataclasses.dataclass
class Encoded:
    input_ids: np.ndarray  # int32 [L], image placeholders expanded
    labels: np.ndarray  # int32 [L], IGNORE outside replies
    num_images: int  # images referenced by the kept turns
    dropped_turns: int


class ConversationEncoder:
    """Renders with a template, tokenizes, masks, expands images and truncates by turns."""

    def __init__(self, tokenizer, template: Template, image_tokens: int, image_token_id: int,
                 max_length: int):
        self.tokenizer, self.template = tokenizer, template
        self.image_tokens, self.image_token_id = image_tokens, image_token_id
        self.max_length = max_length
        if tokenizer.convert_tokens_to_ids(IMAGE) in (None, tokenizer.unk_token_id):
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]},
                                         replace_extra_special_tokens=False)
        self.tok_image_id = tokenizer.convert_tokens_to_ids(IMAGE)
        eot = template.end_of_turn
        if eot and len(tokenizer.encode(eot, add_special_tokens=False)) != 1:
            raise ValueError(f"template {template.name!r} ends turns with {eot!r}, which this "
                             "tokenizer does not have as one token: pick the template that "
                             "matches the model's tokenizer")

    def encode(self, system, pairs, num_images: int) -> Encoded:
        """Raises ConversationError for samples that cannot be used."""
        dropped = 0
        while True:
            rendered = self.template.render(system, pairs)
            placeholders = rendered.text.count(IMAGE)
            if dropped == 0 and placeholders != num_images:
                raise ConversationError("image_count_mismatch",
                                        f"{placeholders} <image> for {num_images} images")
            ids, labels = self._tokenize(rendered)
            ids, labels = self._expand_images(ids, labels)
            if len(ids) <= self.max_length:
                return Encoded(ids, labels, placeholders, dropped)
            if len(pairs) == 1:
                raise ConversationError("too_long", f"{len(ids)} > {self.max_length} tokens")
            pairs = pairs[:-1]  # never cut through image tokens: drop whole later turns
            dropped += 1

    def _tokenize(self, rendered):
        text = rendered.text
        enc = self.tokenizer(text, add_special_tokens=self.template.add_special_tokens,
                             return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int32)
        labels = np.full(len(ids), IGNORE, np.int32)
        covered = np.zeros(len(text), bool)
        for i, (s, e) in enumerate(enc["offset_mapping"]):
            if e <= s:
                continue  # added special tokens (BOS) have empty spans
            cs = s
            while cs < e and text[cs].isspace():
                cs += 1
            core = (cs, e) if cs < e else (s, e)
            for ts, te in rendered.targets:
                if ts <= core[0] and core[1] <= te:
                    labels[i] = ids[i]
                    covered[s:e] = True
                elif core[0] < te and core[1] > ts:
                    raise ConversationError("tokenization_mismatch",
                                            f"token {text[s:e]!r} straddles a reply boundary")
        for ts, te in rendered.targets:
            span = np.frombuffer(text[ts:te].encode("utf-32-le"), np.uint32)
            missing = ~covered[ts:te] & ~np.isin(span, [ord(c) for c in " \t\n\r"])
            if missing.any():
                raise ConversationError("tokenization_mismatch",
                                        f"reply text {text[ts:te][:30]!r} not covered by tokens")
        return ids, labels

    def _expand_images(self, ids, labels):
        where = np.flatnonzero(ids == self.tok_image_id)
        if not len(where):
            return ids, labels
        repeats = np.where(ids == self.tok_image_id, self.image_tokens, 1)
        ids = np.repeat(np.where(ids == self.tok_image_id, self.image_token_id, ids), repeats)
        labels = np.repeat(labels, repeats)
        labels[ids == self.image_token_id] = IGNORE
        return ids.astype(np.int32), labels.astype(np.int32)
