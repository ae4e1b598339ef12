"""Our port of LLaVA's own preprocessing, for comparing mmjax's encoding against it.

Written from reading haotian-liu/LLaVA (`llava/train/train.py`: `preprocess_multimodal`,
`preprocess_plain`, `preprocess_v1`; `llava/mm_utils.py`: `tokenizer_image_token`;
`llava/conversation.py`: `conv_vicuna_v1`, `conv_llava_plain`) and LLaVA-VL/LLaVA-NeXT
(`llava/train/train.py`: `preprocess_multimodal`, `preprocess_llama3`, `preprocess_qwen`),
keeping their arithmetic as it is, quirks included. Differences forced by running it here,
each marked "port:" below: lists instead of torch tensors; transformers 5's
`apply_chat_template` returns a dict unless asked for a list; NeXT's hard-coded Qwen2 newline
id 198 becomes this tokenizer's newline id; NeXT's `additional_special_tokens_ids` unpacking
becomes a lookup by name.

Each function returns (input_ids, labels, mismatch): images as IMAGE_TOKEN_INDEX (-200),
labels IGNORE_INDEX (-100) where nothing is learned, and whether LLaVA printed its
"tokenization mismatch" warning (after which it learns nothing from the sample).
"""
from __future__ import annotations

import copy

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
IS_TOKENIZER_GREATER_THAN_0_14 = True  # tokenizers 0.23 here

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's "
                    "questions.")
LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand "
                 "the visual content that the user provides, and assist the user with a "
                 "variety of tasks using natural language.")
# Meta-Llama-3-8B-Instruct's chat template (what preprocess_llama3 applies)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
QWEN_RESET_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


# --------------------------------------------------------------------------- LLaVA-1.5
def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(x, sep):
        return [ele for sublist in zip(x, [sep] * len(x)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if (len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0
            and prompt_chunks[0][0] == tokenizer.bos_token_id):
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def preprocess_multimodal_v15(source):
    source = copy.deepcopy(source)
    for sentence in source:
        if DEFAULT_IMAGE_TOKEN in sentence["value"]:
            sentence["value"] = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            sentence["value"] = DEFAULT_IMAGE_TOKEN + "\n" + sentence["value"]
            sentence["value"] = sentence["value"].strip()
    return source


def vicuna_v1_prompt(source, system=VICUNA_V1_SYSTEM):
    """conv_vicuna_v1.get_prompt() (SeparatorStyle.TWO, sep ' ', sep2 '</s>')."""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, sentence in enumerate(source):
        role, message = roles[sentence["from"]], sentence["value"]
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def preprocess_v1(source, tokenizer, has_image):
    if has_image:
        source = preprocess_multimodal_v15(source)
    conversation = vicuna_v1_prompt(source)
    if has_image:
        input_ids = tokenizer_image_token(conversation, tokenizer)
    else:
        input_ids = tokenizer(conversation).input_ids
    target = list(input_ids)
    sep = " " + "ASSISTANT" + ": "
    # LLaVA sets pad_token = unk_token for v1 and counts non-pad tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    total_len = sum(1 for t in input_ids if t != pad)
    rounds = conversation.split("</s>")
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    # port: LLaVA reads `tokenizer.legacy`, which a byte-level tokenizer does not have
    # (AttributeError there); treated as legacy (no adjustment)
    legacy = getattr(tokenizer, "legacy", True)
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if has_image:
            round_len = len(tokenizer_image_token(rou, tokenizer))
            instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        else:
            round_len = len(tokenizer(rou).input_ids)
            instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        if i != 0 and not legacy and IS_TOKENIZER_GREATER_THAN_0_14:
            round_len -= 1
            instruction_len -= 1
        lo, hi = cur_len, min(cur_len + instruction_len, len(target))
        target[lo:hi] = [IGNORE_INDEX] * max(0, hi - lo)
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * max(0, len(target) - cur_len)
    mismatch = cur_len != total_len
    if mismatch:
        target = [IGNORE_INDEX] * len(target)
    return input_ids, target, mismatch


def preprocess_plain(source, tokenizer):
    assert len(source) == 2 and DEFAULT_IMAGE_TOKEN in source[0]["value"]
    conversation = DEFAULT_IMAGE_TOKEN + source[1]["value"] + "\n"  # conv_llava_plain sep
    input_ids = tokenizer_image_token(conversation, tokenizer)
    target = list(input_ids)
    n = len(tokenizer_image_token(DEFAULT_IMAGE_TOKEN, tokenizer))
    target[:n] = [IGNORE_INDEX] * n
    return input_ids, target, False


# --------------------------------------------------------------------------- LLaVA-NeXT
def preprocess_multimodal_next(source):
    source = copy.deepcopy(source)
    for sentence in source:
        num_im = sentence["value"].count(DEFAULT_IMAGE_TOKEN)
        if num_im == 1 and not sentence["value"].startswith(DEFAULT_IMAGE_TOKEN):
            sentence["value"] = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            sentence["value"] = DEFAULT_IMAGE_TOKEN + "\n" + sentence["value"]
            sentence["value"] = sentence["value"].strip()
    return source


def _chat(tokenizer, messages):
    # port: transformers 5 returns a BatchEncoding unless return_dict=False
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


def _next_common(source, tokenizer, system_message, unmask_ids, first):
    roles = {"human": "user", "gpt": "assistant"}
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    input_id = _chat(tokenizer, [{"role": "system", "content": system_message}])
    target = [IGNORE_INDEX] * len(input_id)
    for conv in source:
        role = roles.get(conv["from"], conv["from"])
        encode_id = _chat(tokenizer, [{"role": role, "content": conv["value"]}])[first:]
        input_id += encode_id
        target += [IGNORE_INDEX] * len(encode_id) if role in ("user", "system") else encode_id
    for idx, encode_id in enumerate(input_id):
        if encode_id in unmask_ids:
            target[idx] = encode_id
        if encode_id == image_token_index:
            input_id[idx] = IMAGE_TOKEN_INDEX
    return input_id, target, False


def preprocess_llama3(source, tokenizer, has_image, system_message=LLAMA3_SYSTEM):
    if has_image:
        source = preprocess_multimodal_next(source)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE  # a Llama-3 tokenizer ships this one
    if has_image:
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    unmask = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
              "\n\n"]
    unmask_ids = [tokenizer.convert_tokens_to_ids(t) for t in unmask]
    # "First is bos token we don't need here": every message but the system one drops it
    return _next_common(source, tokenizer, system_message, unmask_ids, first=1)


def newline_id(tokenizer) -> int:
    """port: NeXT hard-codes 198, Qwen2's id of the token "\\n" is inside text."""
    with_nl = tokenizer("a\n", add_special_tokens=False).input_ids
    return with_nl[-1]


def preprocess_qwen(source, tokenizer, has_image, system_message="You are a helpful assistant."):
    if has_image:
        source = preprocess_multimodal_next(source)
    tokenizer = copy.deepcopy(tokenizer)
    if has_image:
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    # port: `im_start, im_end = tokenizer.additional_special_tokens_ids` by name
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.chat_template = QWEN_RESET_TEMPLATE
    return _next_common(source, tokenizer, system_message,
                        [newline_id(tokenizer), im_start, im_end], first=0)


REFERENCES = {
    "plain": lambda src, tok, has_image: preprocess_plain(src, tok),
    "vicuna_v1": preprocess_v1,
    "llama_3": preprocess_llama3,
    "chatml": preprocess_qwen,
}
