"""The conversation templates as Jinja chat templates (transformers' `apply_chat_template`):
what an exported model's tokenizer and processor render, the same text as
`mmjax.data.templates` renders for training (tested against it).
"""
from __future__ import annotations

import json

from mmjax.data import templates
from mmjax.data.templates import IMAGE

CHAT_TEMPLATES = {
    # each renders exactly what mmjax.data.templates renders (tested against it): a user
    # message's images first, as "<image>\n", then its text
    "vicuna_v1": (
        "{%- set ns = namespace(system=SYSTEM) -%}"
        "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = TEXT -%}"
        "{%- endfor -%}{{- ns.system + ' ' -}}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' -%}{{- 'USER: ' + TEXT + ' ' -}}"
        "{%- else -%}{{- 'ASSISTANT: ' + TEXT + '</s>' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"),
    "mistral_instruct": (
        "{%- set ns = namespace(system='', first=true) -%}"
        "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = TEXT -%}"
        "{%- endfor -%}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' -%}{{- '[INST] ' -}}"
        "{%- if ns.first and ns.system -%}{{- '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' -}}"
        "{%- endif -%}{%- set ns.first = false -%}{{- TEXT + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' + TEXT + ' </s>' -}}{%- endif -%}{%- endfor -%}"),
    "chatml": (
        "{%- set ns = namespace(system=SYSTEM) -%}"
        "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = TEXT -%}"
        "{%- endfor -%}{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' -}}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + TEXT + '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"),
    "llama_3": (
        "{%- set ns = namespace(system=SYSTEM) -%}"
        "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = TEXT -%}"
        "{%- endfor -%}{{- bos_token + '<|start_header_id|>system<|end_header_id|>\\n\\n' + "
        "ns.system | trim + '<|eot_id|>' -}}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + TEXT | trim + "
        "'<|eot_id|>' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"),
}
# a message's text: a string as it is, or its image parts as "<image>\n" then its text
# parts; IMAGE is "<image>" followed by the image suffix
_TEXT = ("((m['content'] | replace('<image>', IMAGE) if m['content'] is string else "
         "(m['content'] | selectattr('type', 'equalto', 'image') | map(attribute='type') "
         "| map('replace', 'image', IMAGE + '\\n') | join('')) + "
         "(m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
         "| join(' '))))")


def chat_template(name: str, image_suffix: str = "") -> str | None:
    """A Jinja chat template that renders the run's conversation template (None for
    `plain`, which is not a chat format, and for the tokenizer's own).

    `image_suffix` follows every `<image>`: " " makes a tokenizer that prepends "▁" only to
    the start of the text (sentencepiece, legacy=False) give the ids LLaVA's
    `tokenizer_image_token` trained on, where the text after each image was tokenized on
    its own and so began with "▁" (`mmjax.export` picks it by comparing ids)."""
    if name not in CHAT_TEMPLATES:
        return None
    system = {"vicuna_v1": templates.VICUNA_SYSTEM, "chatml": templates.CHATML_SYSTEM,
              "llama_3": templates.LLAMA3_SYSTEM}.get(name, "")
    return (CHAT_TEMPLATES[name].replace("SYSTEM", json.dumps(system)).replace("TEXT", _TEXT)
            .replace("IMAGE", json.dumps(IMAGE + image_suffix)))


