"""Conversation templates: a conversation -> rendered text + the character spans to learn.

Labels are decided on characters, then mapped to tokens by the tokenizer's offsets
(`mmjax.data.tokenize`): the span of each assistant reply (with its end-of-turn marker) is
the target, everything else is context. This is exact whatever the tokenizer does at the
boundaries, and a token that straddles a span boundary is detected rather than guessed.

Templates (LLaVA's conversation styles):
- `plain` (stage 1): `<image>` + caption + "\\n"; the caption and its newline are learned.
- `vicuna_v1` (LLaVA-1.5): "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."
- `llama_3`: Llama-3 header tokens, turns end with <|eot_id|>.
- `chatml` (Qwen): <|im_start|>role\\n...<|im_end|>\\n
- `chat_template`: the tokenizer's own Jinja chat template.
"""
from __future__ import annotations

import dataclasses

IMAGE = "<image>"
HUMAN_ROLES = {"human", "user"}
GPT_ROLES = {"gpt", "assistant"}
SYSTEM_ROLES = {"system"}

VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's "
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


@dataclasses.dataclass(frozen=True)
class Rendered:
    text: str
    targets: tuple[tuple[int, int], ...]  # [start, end) character spans to learn
    num_turns: int  # (question, answer) pairs rendered


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


def _image_first(question: str) -> str:
    # LLaVA puts the image placeholder at the start of its message.
    if IMAGE in question and not question.startswith(IMAGE):
        question = IMAGE + "\n" + question.replace(IMAGE, "").strip()
    return question


class Template:
    name = "base"
    add_special_tokens = True  # whether the tokenizer should add its BOS
    end_of_turn = ""

    def render(self, system, pairs) -> Rendered:
        raise NotImplementedError


class Plain(Template):
    name = "plain"

    def render(self, system, pairs):
        question, caption = pairs[0]
        images = question.count(IMAGE)
        text = IMAGE * images
        start = len(text)
        text += caption + "\n"
        return Rendered(text, ((start, len(text)),), 1)


class Vicuna(Template):
    name = "vicuna_v1"
    end_of_turn = "</s>"

    def render(self, system, pairs):
        text = (system if system is not None else VICUNA_SYSTEM) + " "
        targets = []
        for k, (q, a) in enumerate(pairs):
            q = _image_first(q) if k == 0 else q
            text += f"USER: {q} ASSISTANT: "
            start = len(text)
            text += a + "</s>"
            targets.append((start, len(text)))
        return Rendered(text, tuple(targets), len(pairs))


class Llama3(Template):
    name = "llama_3"
    add_special_tokens = False
    end_of_turn = "<|eot_id|>"

    def render(self, system, pairs):
        def header(role):
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

        text = "<|begin_of_text|>" + header("system")
        text += (system if system is not None else LLAMA3_SYSTEM) + "<|eot_id|>"
        targets = []
        for k, (q, a) in enumerate(pairs):
            q = _image_first(q) if k == 0 else q
            text += header("user") + q + "<|eot_id|>" + header("assistant")
            start = len(text)
            text += a + "<|eot_id|>"
            targets.append((start, len(text)))
        return Rendered(text, tuple(targets), len(pairs))


class ChatML(Template):
    name = "chatml"
    add_special_tokens = False
    end_of_turn = "<|im_end|>"

    def render(self, system, pairs):
        text = f"<|im_start|>system\n{system if system is not None else CHATML_SYSTEM}<|im_end|>\n"
        targets = []
        for k, (q, a) in enumerate(pairs):
            q = _image_first(q) if k == 0 else q
            text += f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
            start = len(text)
            text += a + "<|im_end|>"
            targets.append((start, len(text)))
            text += "\n"
        return Rendered(text, tuple(targets), len(pairs))


class TokenizerChatTemplate(Template):
    """The tokenizer's own chat template; each reply's span comes from rendering prefixes."""

    name = "chat_template"
    add_special_tokens = False

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat_template' needs a tokenizer with a chat_template")
        self.tokenizer = tokenizer

    def _apply(self, messages, prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=prompt)

    def render(self, system, pairs):
        messages = [] if system is None else [{"role": "system", "content": system}]
        targets, renderings = [], []
        for k, (q, a) in enumerate(pairs):
            messages.append({"role": "user", "content": _image_first(q) if k == 0 else q})
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
            renderings.append(text)
        if not all(text.startswith(r) for r in renderings):
            raise ConversationError("tokenization_mismatch", "chat template rewrites turns")
        return Rendered(text, tuple(targets), len(pairs))


TEMPLATES = {t.name: t for t in (Plain, Vicuna, Llama3, ChatML)}


def get_template(name: str, tokenizer=None) -> Template:
    if name == "chat_template":
        return TokenizerChatTemplate(tokenizer)
    try:
        return TEMPLATES[name]()
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: "
                         f"{', '.join(sorted(TEMPLATES) + ['chat_template'])}") from None
