"""Conversation -> token ids and labels, with image placeholders expanded.

The text is tokenized in the units the template's reference preprocessing uses (LLaVA-1.5:
the pieces between images; LLaVA-NeXT: one message at a time), so the ids are the ones a
LLaVA checkpoint was trained on. Labels are -100 except on what the template learns. They
come from character spans (`templates.Segment.targets`) through the tokenizer's offsets, so
the mask is exact by construction; a token that straddles a span boundary, or a span that no
token covers, is a "tokenization mismatch" (the bug that silently zeroes LLaVA's loss on whole
samples) and the sample is refused, counted, instead of trained on. Sample text that the
tokenizer would read as a control token (`</s>`, `<|im_end|>`, `<image>` in a reply, ...) is
refused as `special_token_text` (or kept, if asked).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import numpy as np
from tokenizers import AddedToken

from mmjax.batch import IGNORE
from mmjax.data.templates import IMAGE, VIDEO, ConversationError, Rendered, Segment, Template

__all__ = ["ENCODING_VERSION", "ConversationEncoder", "Encoded", "add_image_token", "has_token"]
# Bumped whenever the ids or labels produced for the same data change; anything derived
# from encoded data and kept (token-length reports) records it.
#   2: LLaVA-1.5 / LLaVA-NeXT reference layouts (pieces between images, per-message units,
#      vicuna_v1 system prompt, trained separator, image tidying, control-token refusal)
ENCODING_VERSION = 2
SPECIAL_TOKEN_TEXT = ("skip", "keep")


def has_token(tokenizer, token: str) -> bool:
    """Whether `token` is one entry of the tokenizer's vocabulary."""
    return tokenizer.convert_tokens_to_ids(token) not in (None, tokenizer.unk_token_id)


def add_image_token(tokenizer, token: str = IMAGE) -> bool:
    """Adds the image placeholder as a special token (never split or normalised), as
    llava-hf's conversion does, unless the tokenizer has it; True when it was added."""
    if has_token(tokenizer, token):
        return False
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(token, special=True, normalized=False)]},
        replace_extra_special_tokens=False)
    return True


@dataclasses.dataclass
class Encoded:
    input_ids: np.ndarray  # int32 [L], image placeholders expanded
    labels: np.ndarray  # int32 [L], IGNORE outside replies
    num_images: int  # images referenced by the kept turns
    dropped_turns: int


class ConversationEncoder:
    """Renders with a template, tokenizes, masks, expands images and truncates by turns."""

    def __init__(self, tokenizer, template: Template, image_tokens: int, image_token_id: int,
                 max_length: int, special_token_text: str = "skip", video_token_id: int = -1):
        if special_token_text not in SPECIAL_TOKEN_TEXT:
            raise ValueError(f"special_token_text {special_token_text!r}: one of "
                             f"{', '.join(SPECIAL_TOKEN_TEXT)}")
        if not has_token(tokenizer, IMAGE):
            # the placeholder needs to be one token; the caller's tokenizer stays as it was
            tokenizer = copy.deepcopy(tokenizer)
            add_image_token(tokenizer)
        self.tokenizer, self.template = tokenizer, template
        self.image_tokens, self.image_token_id = image_tokens, image_token_id
        self.max_length = max_length
        self.keep_special_text = special_token_text == "keep"
        self.tok_image_id = tokenizer.convert_tokens_to_ids(IMAGE)
        # OneVision: <video> placeholders expand to `video_token_id` (the tokenizer's own)
        self.video_token_id = video_token_id
        self.tok_video_id = tokenizer.convert_tokens_to_ids(VIDEO) if (
            video_token_id >= 0 and has_token(tokenizer, VIDEO)) else -1
        self.placeholders = (IMAGE, VIDEO) if self.tok_video_id >= 0 else (IMAGE,)
        eot = template.end_of_turn
        if eot and len(tokenizer.encode(eot, add_special_tokens=False)) != 1:
            raise ValueError(f"template {template.name!r} ends turns with {eot!r}, which this "
                             "tokenizer does not have as one token: pick the template that "
                             "matches the model's tokenizer")
        special = ({i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
                   | set(tokenizer.all_special_ids))
        special -= {tokenizer.unk_token_id, self.tok_image_id, self.tok_video_id}
        self.special_ids = np.asarray(sorted(special), np.int64)
        # a control token can only come from text that holds its string: checked first
        self.special_strings = tuple(tokenizer.convert_ids_to_tokens(sorted(special)))
        self.trained_ids = np.asarray(sorted(_vocab_ids(tokenizer, template.always_trained)),
                                      np.int64)

    def render(self, system, pairs) -> Rendered:
        """The template's rendering, after the reference's image tidying."""
        return self.template.render(system, self._tidy(pairs))

    def encode(self, system, pairs, num_images: int,
               image_tokens: Sequence[int] | None = None) -> Encoded:
        """Raises ConversationError for samples that cannot be used. `image_tokens`: each
        image's token count, in order (any-resolution models; default: the encoder's one
        count for every image)."""
        pairs = self._tidy(pairs)
        dropped = 0
        while True:
            rendered = self.template.render(system, pairs)
            placeholders = sum(rendered.text.count(p) for p in self.placeholders)
            if dropped == 0 and placeholders != num_images:
                raise ConversationError("image_count_mismatch", f"{placeholders} "
                                        f"{' / '.join(self.placeholders)} for {num_images} "
                                        "images")
            ids, labels = self._tokenize(rendered.segments)
            ids, labels = self._expand_images(ids, labels, image_tokens)
            if len(ids) <= self.max_length:
                return Encoded(ids, labels, placeholders, dropped)
            if len(pairs) == 1:
                raise ConversationError("too_long", f"{len(ids)} > {self.max_length} tokens")
            pairs = pairs[:-1]  # never cut through image tokens: drop whole later turns
            dropped += 1

    def prompt_ids(self, system, pairs, image_tokens: Sequence[int] | None = None
                   ) -> np.ndarray:
        """int32 [L]: the ids of a conversation whose last reply the model is to write, up to
        where that reply begins, images expanded, as training lays them out (the last pair's
        answer is ignored). What evaluation and generation feed the model. `image_tokens`:
        as in `encode`."""
        rendered = self.render(system, [*pairs[:-1], (pairs[-1][0], "")])
        ids, _ = self._tokenize(rendered.prompt(), learn=False)
        ids, _ = self._expand_images(ids, np.full(len(ids), IGNORE, np.int32), image_tokens)
        return ids

    def _tidy(self, pairs):
        """The reference's image layout; `<image>` in a reply is refused (it would become an
        image slot where the model writes)."""
        if any(IMAGE in a for _, a in pairs):
            raise ConversationError("special_token_text", f"{IMAGE} in a reply")
        if sum(q.count(IMAGE) for q, _ in pairs) != 1:
            return pairs  # interleaved images stay where the text puts them
        return [(self.template.tidy(q), a) for q, a in pairs]

    def _tokenize(self, segments: tuple[Segment, ...], learn: bool = True):
        """Token ids (images as the tokenizer's placeholder id) and labels of the segments."""
        ids_out, labels_out = [], []
        chunked = self.template.image_chunks
        bos = self.tokenizer.bos_token_id
        strip_bos = False
        for n, seg in enumerate(segments):
            pieces = seg.text.split(IMAGE) if chunked else [seg.text]
            at = 0
            for k, piece in enumerate(pieces):
                ids, offsets = self._encode(piece)
                if chunked:
                    # tokenizer_image_token: every piece is tokenized with the tokenizer's
                    # BOS; when the first one starts with it, the others drop theirs
                    if n == 0 and k == 0:
                        strip_bos = bool(len(ids)) and ids[0] == bos
                    elif strip_bos and len(ids) and ids[0] == bos:
                        ids, offsets = ids[1:], offsets[1:]
                ids_out.append(ids)
                labels_out.append(self._labels(piece, ids, offsets,
                                               _clip(seg.targets, at, len(piece)),
                                               _clip(seg.data, at, len(piece)))
                                  if learn else np.full(len(ids), IGNORE, np.int32))
                if k < len(pieces) - 1:
                    ids_out.append(np.asarray([self.tok_image_id], np.int32))
                    labels_out.append(np.asarray([IGNORE], np.int32))
                at += len(piece) + len(IMAGE)
        ids = np.concatenate(ids_out).astype(np.int32) if ids_out else np.zeros(0, np.int32)
        labels = (np.concatenate(labels_out).astype(np.int32) if labels_out
                  else np.zeros(0, np.int32))
        if learn and len(self.trained_ids):
            trained = np.isin(ids, self.trained_ids)
            labels = np.where(trained, ids, labels).astype(np.int32)
        return ids, labels

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

    def _labels(self, text, ids, offsets, targets, data) -> np.ndarray:
        """Labels of one tokenized unit: ids inside the target spans, IGNORE elsewhere."""
        start, end = offsets[:, 0], offsets[:, 1]
        real = end > start  # added special tokens (BOS) have empty spans
        if (not self.keep_special_text and len(self.special_ids)
                and any(t in text[a:b] for a, b in data for t in self.special_strings)):
            special = real & np.isin(ids, self.special_ids)
            for ds, de in data:
                inside = special & (start >= ds) & (end <= de)
                if inside.any():
                    i = int(np.flatnonzero(inside)[0])
                    raise ConversationError("special_token_text", f"{text[start[i]:end[i]]!r} "
                                            "in the sample's text would be a control token")
        if not targets:
            return np.full(len(ids), IGNORE, np.int32)
        chars = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        space = (chars == 32) | ((chars >= 9) & (chars <= 13))  # " \t\n\v\f\r"
        # next_solid[i]: first non-space character at or after i (len(text) if none)
        solid = np.where(space, len(text), np.arange(len(text)))
        next_solid = np.append(np.minimum.accumulate(solid[::-1])[::-1], len(text))
        core_start = np.where(real, next_solid[np.minimum(start, len(text))], start)
        core_start = np.where(core_start < end, core_start, start)  # whitespace-only tokens
        inside = np.zeros(len(ids), bool)
        for ts, te in targets:
            if te <= ts:
                continue
            within = real & (start >= ts) & (end <= te)
            # a token whose text begins with whitespace before the span and whose solid part
            # lies inside it (byte-level "Ġyes" offsets include the space) belongs to it
            within |= real & (start < ts) & (core_start >= ts) & (end <= te) & (end > ts)
            straddles = real & ~within & (start < te) & (end > ts)
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
        return np.where(inside, ids, IGNORE).astype(np.int32)

    def _expand_images(self, ids, labels, counts: Sequence[int] | None = None):
        """Each placeholder -> its image's tokens (`counts[k]` for the k-th, else the
        encoder's `image_tokens`); a video's at `video_token_id`."""
        media = np.isin(ids, [self.tok_image_id, self.tok_video_id])
        where = np.flatnonzero(media)
        if not len(where):
            return ids, labels
        repeats = np.ones(len(ids), np.int64)
        if counts is None:
            if not self.image_tokens:
                raise ValueError("this encoder has no one image token count: pass each "
                                 "image's (image_tokens=)")
            repeats[where] = self.image_tokens
        else:
            if len(counts) < len(where):
                raise ConversationError("image_count_mismatch", f"{len(where)} <image> for "
                                        f"{len(counts)} image token counts")
            repeats[where] = counts[:len(where)]
        model_ids = np.where(ids == self.tok_image_id, self.image_token_id, ids)
        model_ids = np.where(ids == self.tok_video_id, self.video_token_id, model_ids)
        ids = np.repeat(model_ids, repeats)
        labels = np.repeat(labels, repeats)
        labels[np.repeat(media, repeats)] = IGNORE
        return ids.astype(np.int32), labels.astype(np.int32)


def _clip(spans, at: int, length: int):
    """Spans of a segment, in the coordinates of its piece [at, at + length), cut to it."""
    out = ((max(a - at, 0), min(b - at, length)) for a, b in spans)
    return tuple((a, b) for a, b in out if a < b)


def _vocab_ids(tokenizer, tokens) -> set[int]:
    """Ids of vocabulary entries ("\\n": the tokenizer's newline token)."""
    out = set()
    for token in tokens:
        if token == "\n":
            # the single token a newline becomes inside text (Qwen2: 198)
            with_nl = tokenizer.encode("a\n", add_special_tokens=False)
            without = tokenizer.encode("a", add_special_tokens=False)
            if with_nl[:len(without)] == without and len(with_nl) == len(without) + 1:
                out.add(with_nl[-1])
            continue
        i = tokenizer.convert_tokens_to_ids(token)
        if i is not None:
            out.add(int(i))
    return out
