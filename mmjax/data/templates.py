"""Conversation templates: a conversation -> text segments to tokenize + character spans to learn.

Each template reproduces the preprocessing of the LLaVA code base it comes from, down to
what is tokenized as one unit, because token ids depend on it:

- `plain` (stage 1; LLaVA `preprocess_plain`): `<image>` + caption + "\\n" (the question is
  dropped); everything after the image is learned.
- `vicuna_v1` (LLaVA-1.5, `conv_vicuna_v1` + `preprocess_v1`):
  "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."; the reply is learned from the space after
  "ASSISTANT:" (LLaVA trains that separator, a token of its own before digits, newlines or
  spaces) through its "</s>".
  Both split the text at each `<image>` and tokenize the pieces one by one, as LLaVA's
  `tokenizer_image_token` does (the text after an image starts a new piece: with a Llama
  tokenizer it gets its own "▁").
- `llama_3` (LLaVA-NeXT `preprocess_llama3`): Llama-3 headers, each message tokenized on its
  own with `<image>` as a special token inside it and its content stripped (the Llama-3 chat
  template's `trim`); an assistant message is learned whole (header included), and the
  header and end-of-turn special tokens are learned wherever they occur.
- `chatml` (LLaVA-NeXT `preprocess_qwen`): "<|im_start|>role\\n{content}<|im_end|>\\n" per
  message, tokenized on its own; assistant messages learned whole, plus every
  `<|im_start|>`, `<|im_end|>` and newline token.
- `mistral_instruct` (LLaVA-NeXT `conv_mistral_instruct`, LLaVA-1.6-Mistral):
  "[INST] {q} [/INST] {a} </s>" per round, images split out as for LLaVA-1.5.
- `chat_template`: the tokenizer's own Jinja chat template (no LLaVA counterpart).

Labels are decided on characters and mapped to tokens by the tokenizer's offsets
(`mmjax.data.tokenize`), so they are exact whatever the tokenizer does at the boundaries; a
token straddling a span boundary is detected, not guessed.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

IMAGE = "<image>"
VIDEO = "<video>"  # LLaVA-OneVision's video placeholder
# a template by name, or `auto` (the LLM family's: `default_template`)
TemplateName = Literal["auto", "plain", "vicuna_v1", "mistral_instruct", "llama_3", "chatml",
                       "chat_template"]
HUMAN_ROLES = {"human", "user"}
GPT_ROLES = {"gpt", "assistant"}
SYSTEM_ROLES = {"system"}

# LLaVA's conv_vicuna_v1 (what LLaVA-1.5 trains with; "curious human" is conv_llava_v1)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")
LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand "
                 "the visual content that the user provides, and assist the user with a "
                 "variety of tasks using natural language.")
CHATML_SYSTEM = "You are a helpful assistant."


class ConversationError(ValueError):
    """A conversation that cannot be rendered; `reason` is a quality.REASONS entry."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


Span = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Segment:
    """Text the tokenizer encodes as one unit (LLaVA-NeXT: one message)."""

    text: str
    targets: tuple[Span, ...] = ()  # [start, end) character spans whose tokens are learned
    data: tuple[Span, ...] = ()  # spans of the sample's own text (checked for control tokens)


@dataclasses.dataclass(frozen=True)
class Rendered:
    segments: tuple[Segment, ...]
    replies: tuple[tuple[int, int], ...]  # (segment, character) where each reply begins
    num_turns: int  # (question, answer) pairs rendered

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    def prompt(self) -> tuple[Segment, ...]:
        """The segments up to where the last reply begins (what generation starts from)."""
        seg, pos = self.replies[-1]
        return self.segments[:seg] + (Segment(self.segments[seg].text[:pos]),)


def normalize_turns(conversations) -> tuple[str | None, list[tuple[str, str]]]:
    """(system prompt or None, [(question, answer), ...]) with the checks every template needs."""
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError("malformed_record", "no conversations")
    system = None
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ConversationError("malformed_record", f"turn {i} is not {{from, value}}")
        role = str(turn.get("from", turn.get("role", ""))).lower()
        if role in SYSTEM_ROLES and i == 0:
            system = turn["value"]
            continue
        if role in HUMAN_ROLES:
            kind = "human"
        elif role in GPT_ROLES:
            kind = "gpt"
        else:
            raise ConversationError("unknown_role", repr(role))
        turns.append((kind, turn["value"]))
    pairs = []
    for j in range(0, len(turns), 2):
        pair = turns[j:j + 2]
        if len(pair) != 2 or pair[0][0] != "human" or pair[1][0] != "gpt":
            raise ConversationError("turns_not_alternating",
                                    "expected human, gpt, human, gpt, ...")
        if not pair[1][1].strip():
            raise ConversationError("empty_reply", f"turn {j + 1}")
        pairs.append((pair[0][1], pair[1][1]))
    return system, pairs


class Template:
    name = "base"
    add_special_tokens = True  # whether each unit is tokenized with the tokenizer's BOS
    image_chunks = False  # True: split at <image>, pieces tokenized alone (LLaVA-1.5)
    end_of_turn = ""
    always_trained: tuple[str, ...] = ()  # vocabulary tokens learned wherever they occur

    def render(self, system, pairs) -> Rendered:
        raise NotImplementedError

    def tidy(self, question: str) -> str:
        """The first question's image layout, as the reference preprocessing rewrites it."""
        return question


def _tidy_llava15(question: str) -> str:
    # LLaVA-1.5 preprocess_multimodal: "<image>\n" + the rest stripped, whatever the layout
    if IMAGE not in question:
        return question
    return (IMAGE + "\n" + question.replace(IMAGE, "").strip()).strip()


def _tidy_next(question: str) -> str:
    # LLaVA-NeXT: only a question that does not start with its (single) image is rewritten
    if question.count(IMAGE) != 1 or question.startswith(IMAGE):
        return question
    return (IMAGE + "\n" + question.replace(IMAGE, "").strip()).strip()


class Plain(Template):
    name = "plain"
    image_chunks = True

    def render(self, system, pairs):
        question, caption = pairs[0]
        text = IMAGE * question.count(IMAGE)
        start = len(text)
        text += caption + "\n"
        seg = Segment(text, ((start, len(text)),), ((start, start + len(caption)),))
        return Rendered((seg,), ((0, start),), 1)


class Vicuna(Template):
    name = "vicuna_v1"
    image_chunks = True
    end_of_turn = "</s>"

    def tidy(self, question):
        return _tidy_llava15(question)

    def render(self, system, pairs):
        system = system if system is not None else VICUNA_SYSTEM
        return _rounds(system + " ", [(0, len(system))], pairs, "USER: ", " ASSISTANT:", "</s>")


def _rounds(text: str, data: list, pairs, open_q: str, close_q: str, end: str) -> Rendered:
    """One segment: `text`, then per round open_q + q + close_q + " " + a + end. The reply is
    learned from the separator space (a token of its own before digits, newlines or spaces
    in LLaVA's tokenization) through `end`."""
    targets, replies = [], []
    for q, a in pairs:
        text += open_q
        data.append((len(text), len(text) + len(q)))
        text += q + close_q
        start = len(text)
        data.append((start + 1, start + 1 + len(a)))
        text += " " + a + end
        targets.append((start, len(text)))
        replies.append((0, start))
    return Rendered((Segment(text, tuple(targets), tuple(data)),), tuple(replies), len(pairs))


class MistralInstruct(Template):
    """LLaVA-NeXT's `conv_mistral_instruct` (LLAMA_2 separator style, empty system):
    "[INST] {q} [/INST] {a} </s>[INST] ..."; images split out as in LLaVA-1.5 (its
    `preprocess_llama_2` tokenizes with `tokenizer_image_token`). The reply is learned from
    the space after "[/INST]" through its "</s>"."""

    name = "mistral_instruct"
    image_chunks = True
    end_of_turn = "</s>"

    def tidy(self, question):
        return _tidy_next(question)

    def render(self, system, pairs):
        if system:  # LLAMA_2 style: the system block opens the first instruction
            (q, a), *rest = pairs
            pairs = [(f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}", a), *rest]
        return _rounds("", [], pairs, "[INST] ", " [/INST]", " </s>")


class _PerMessage(Template):
    """LLaVA-NeXT style: one segment per message, `<image>` a special token inside it."""

    add_special_tokens = False
    default_system = ""

    def tidy(self, question):
        return _tidy_next(question)

    def header(self, role: str) -> str:
        raise NotImplementedError

    def content(self, text: str) -> str:
        return text

    def footer(self) -> str:
        raise NotImplementedError

    def first_prefix(self) -> str:
        return ""

    def _segment(self, role, text, prefix="", learned=False):
        head = prefix + self.header(role)
        body = self.content(text)
        seg_text = head + body + self.footer()
        targets = ((0, len(seg_text)),) if learned else ()
        return Segment(seg_text, targets, ((len(head), len(head) + len(body)),)), len(head)

    def render(self, system, pairs):
        system = system if system is not None else self.default_system
        segments = [self._segment("system", system, self.first_prefix())[0]]
        replies = []
        for q, a in pairs:
            segments.append(self._segment("user", q)[0])
            seg, reply_at = self._segment("assistant", a, learned=True)
            replies.append((len(segments), reply_at))
            segments.append(seg)
        return Rendered(tuple(segments), tuple(replies), len(pairs))


class Llama3(_PerMessage):
    name = "llama_3"
    end_of_turn = "<|eot_id|>"
    default_system = LLAMA3_SYSTEM
    # LLaVA-NeXT's unmask list ("\n\n" is looked up as a vocabulary entry, as it does there)
    always_trained = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>", "\n\n")

    def __init__(self, bos_token: str | None = None):
        self.bos = bos_token or "<|begin_of_text|>"

    def first_prefix(self):
        return self.bos  # the chat template's bos_token, once at the start

    def header(self, role):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def content(self, text):
        return text.strip()  # the Llama-3 chat template's `| trim`

    def footer(self):
        return "<|eot_id|>"


class ChatML(_PerMessage):
    name = "chatml"
    end_of_turn = "<|im_end|>"
    default_system = CHATML_SYSTEM
    always_trained = ("<|im_start|>", "<|im_end|>", "\n")  # "\n": Qwen2's id 198 there

    def header(self, role):
        return f"<|im_start|>{role}\n"

    def footer(self):
        return "<|im_end|>\n"


class TokenizerChatTemplate(Template):
    """The tokenizer's own chat template; each reply's span comes from rendering prefixes."""

    name = "chat_template"
    add_special_tokens = False

    def tidy(self, question):
        return _tidy_next(question)

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat_template' needs a tokenizer with a chat_template")
        self.tokenizer = tokenizer

    def _apply(self, messages, prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=prompt)

    def render(self, system, pairs):
        messages = [] if system is None else [{"role": "system", "content": system}]
        targets, renderings, replies = [], [], []
        for q, a in pairs:
            messages.append({"role": "user", "content": q})
            prefix = self._apply(messages, prompt=True)
            messages.append({"role": "assistant", "content": a})
            text = self._apply(messages, prompt=False)
            reply = text.find(a, len(prefix))
            if not text.startswith(prefix) or reply < 0:
                raise ConversationError("tokenization_mismatch",
                                        "chat template does not extend its own prompt")
            # Learn the reply and the end-of-turn marker the template closes it with.
            end = reply + len(a)
            end += len(text[end:].split("\n", 1)[0])
            targets.append((reply, end))
            replies.append((0, len(prefix)))
            renderings.append(text)
        if not all(text.startswith(r) for r in renderings):
            raise ConversationError("tokenization_mismatch", "chat template rewrites turns")
        # the sample's text is not located inside the rendering: no control-token check
        return Rendered((Segment(text, tuple(targets)),), tuple(replies), len(pairs))


TEMPLATES = {t.name: t for t in (Plain, Vicuna, MistralInstruct, Llama3, ChatML)}


def default_template(family: str, tokenizer) -> str:
    """The chat template LLaVA trains an LLM family with (`data.template="auto"`)."""
    if tokenizer is not None and tokenizer.convert_tokens_to_ids("<|eot_id|>") not in (
            None, tokenizer.unk_token_id):
        return "llama_3"  # Llama-3's tokenizer (family 'llama', like Llama-2 / Vicuna)
    return {"llama": "vicuna_v1", "mistral": "mistral_instruct", "qwen2": "chatml"}[family]


def get_template(name: str, tokenizer=None) -> Template:
    if name == "chat_template":
        return TokenizerChatTemplate(tokenizer)
    if name == "llama_3":
        return Llama3(getattr(tokenizer, "bos_token", None))
    try:
        return TEMPLATES[name]()
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: "
                         f"{', '.join(sorted(TEMPLATES) + ['chat_template'])}") from None
