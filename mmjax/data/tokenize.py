"""Conversation -> token ids and labels, with image placeholders expanded.

Labels are -100 everywhere except on assistant replies and their end-of-turn token. They
come from character spans (`templates.Rendered.targets`) through the tokenizer's offsets, so
the mask is exact by construction; a token that straddles a span boundary, or a span that no
token covers, is a "tokenization mismatch" (the bug that silently zeroes LLaVA's loss on whole
samples) and the sample is refused, counted, instead of trained on.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np

from mmjax.batch import IGNORE
from mmjax.data.templates import IMAGE, ConversationError, Template

__all__ = ["IGNORE", "ConversationEncoder", "Encoded"]
_SPACES = np.asarray([ord(c) for c in " \t\n\r\x0b\x0c"], np.uint32)


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
        if tokenizer.convert_tokens_to_ids(IMAGE) in (None, tokenizer.unk_token_id):
            # the placeholder needs to be one token; the caller's tokenizer stays as it was
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]},
                                         replace_extra_special_tokens=False)
        self.tokenizer, self.template = tokenizer, template
        self.image_tokens, self.image_token_id = image_tokens, image_token_id
        self.max_length = max_length
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

    def prompt_ids(self, system, pairs) -> np.ndarray:
        """int32 [L]: the ids of a conversation whose last reply the model is to write, up to
        where that reply begins, images expanded, as training lays them out (the last pair's
        answer is ignored)."""
        rendered = self.template.render(system, [*pairs[:-1], (pairs[-1][0], "")])
        # the space before a reply belongs to the reply's first token in training
        # ("ASSISTANT: yes" -> ..., "Ġyes"), so the prompt ends before it
        text = rendered.text[:rendered.targets[-1][0]].rstrip(" ")
        ids, _ = self._encode(text)
        ids, _ = self._expand_images(ids, np.full(len(ids), IGNORE, np.int32))
        return ids

    def _encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids [L], character offsets [L, 2]); the Rust backend directly when there is one."""
        add = self.template.add_special_tokens
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode"):
            enc = backend.encode(text, add_special_tokens=add)
            ids, offsets = enc.ids, enc.offsets
        else:
            enc = self.tokenizer(text, add_special_tokens=add, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
        return (np.asarray(ids, np.int32), np.asarray(offsets, np.int64).reshape(-1, 2))

    def _tokenize(self, rendered):
        text = rendered.text
        ids, offsets = self._encode(text)
        start, end = offsets[:, 0], offsets[:, 1]
        chars = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        space = np.isin(chars, _SPACES)
        # next_solid[i]: first non-space character at or after i (len(text) if none)
        solid = np.where(space, len(text), np.arange(len(text)))
        next_solid = np.append(np.minimum.accumulate(solid[::-1])[::-1], len(text))
        real = end > start  # added special tokens (BOS) have empty spans
        core_start = np.where(real, next_solid[np.minimum(start, len(text))], start)
        core_start = np.where(core_start < end, core_start, start)  # whitespace-only tokens
        inside = np.zeros(len(ids), bool)
        for ts, te in rendered.targets:
            within = real & (core_start >= ts) & (end <= te)
            straddles = real & ~within & (core_start < te) & (end > ts)
            if straddles.any():
                i = int(np.flatnonzero(straddles)[0])
                raise ConversationError("tokenization_mismatch", f"token "
                                        f"{text[start[i]:end[i]]!r} straddles a reply boundary")
            covered = np.zeros(te - ts + 1, np.int32)
            np.add.at(covered, np.clip(start[within] - ts, 0, te - ts), 1)
            np.add.at(covered, np.clip(end[within] - ts, 0, te - ts), -1)
            if (~(np.cumsum(covered)[:-1] > 0) & ~space[ts:te]).any():
                raise ConversationError("tokenization_mismatch",
                                        f"reply text {text[ts:te][:30]!r} not covered by tokens")
            inside |= within
        labels = np.where(inside, ids, IGNORE).astype(np.int32)
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
