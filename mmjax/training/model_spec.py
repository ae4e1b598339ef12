"""What a run trains (its `ModelSpec`): the LLaVA config and the tokenizer, resolved once when
a run starts and saved in its work dir, so that stage 2, resume, inference and export see the
same ones. (The configs' stage "recipes" are the training settings; this is the model.)

A fresh run resolves them in this order:

1. `init.stage1_checkpoint` names a work dir that saved them: stage 2 takes its model and
   tokenizer as they are (a named preset or an explicit tokenizer must agree with them).
2. `model="auto"`: the config comes from the Hugging Face configs of `init.hf_llava`, or of
   `init.hf_vision` + `init.hf_llm` with the `llava` section (projector, feature layer and
   select strategy, image token). From separate towers the tokenizer gets `<image>` (and a
   pad token when it has none), as llava-hf's conversion adds them, and the LLM's vocabulary
   grows to a multiple of `llava.vocab_multiple` (`training.init` draws the new rows).
3. A named preset (`mmjax.models.presets`); with HF towers given, it must equal what they
   describe: every differing field is named before anything is computed.

Saved as `WORKDIR/model.json` (the resolved LlavaConfig, template, added tokens and the
weight sources) and `WORKDIR/tokenizer/` (save_pretrained, the added tokens included).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Literal

from mmjax import configlib
from mmjax.data import templates
from mmjax.data.templates import IMAGE
from mmjax.data.tokenize import add_image_token
from mmjax.errors import ConfigError
from mmjax.hf import load_tokenizer, save_tokenizer
from mmjax.hf.config import from_hf, llava_from_hf
from mmjax.hf.weight_files import Checkpoint
from mmjax.models import presets
from mmjax.models.config import LlavaConfig, LLMConfig, ProjectorConfig, VisionConfig

MODEL_FILE = "model.json"
# 2: vision_feature_select="default" drops the first token of any tower (transformers'
# meaning); format 1 dropped it only from towers with a CLS token
FORMAT = 2
TOKENIZER_DIR = "tokenizer"
AUTO = "auto"


FeatureSelect = Literal["auto", "default", "full"]


@dataclasses.dataclass(frozen=True)
class ComposeConfig:
    """How `model="auto"` joins separate HF towers (LLaVA-1.5's choices by default)."""

    projector: str = "mlp2x_gelu"  # linear | mlpNx_gelu
    vision_feature_layer: int = -2  # the tower's hidden state fed to the projector
    # transformers' meaning: "default" drops the tower's first token, "full" keeps all
    vision_feature_select: FeatureSelect = "auto"  # auto: default for CLIP, full for SigLIP
    image_token: Literal["<image>"] = "<image>"  # added to the tokenizer when it has none
    vocab_multiple: int = 64  # the grown vocabulary is a multiple of this
    # anyres on a stage-1 run's or a LLaVA-1.5 checkpoint's model: stage 2 adds the grids
    aspect: Literal["square", "anyres"] = "square"  # anyres: LLaVA-NeXT's views, `grids`
    # LLaVA-NeXT's: 336x672, 672x336, 672x672, 1008x336, 336x1008 at a 336-pixel tower
    grids: tuple[tuple[int, int], ...] = (  # anyres: (rows, columns) of tower-sized tiles
        (1, 2), (2, 1), (2, 2), (3, 1), (1, 3))

    def with_aspect(self, cfg: LlavaConfig) -> LlavaConfig:
        """`cfg` with this section's any-resolution grids, when it asks for them and `cfg`
        has none of its own."""
        if self.aspect != "anyres" or cfg.anyres:
            return cfg
        s = cfg.vision.image_size
        return dataclasses.replace(cfg, image_grid_pinpoints=tuple(
            (r * s, c * s) for r, c in self.grids))


@dataclasses.dataclass
class ModelSpec:
    """The model a run trains, with its tokenizer and conversation template."""

    cfg: LlavaConfig
    tokenizer: object
    template: str  # the resolved template name
    added_tokens: tuple[str, ...] = ()  # tokens this run added to the tokenizer
    base_vocab: int = 0  # the LLM's vocabulary before it grew (0: it did not)
    sources: dict = dataclasses.field(default_factory=dict)  # hf_vision / hf_llm / hf_llava

    def describe(self) -> str:
        c = self.cfg
        grown = (f", vocabulary {self.base_vocab} -> {c.llm.vocab_size}"
                 if self.base_vocab and self.base_vocab != c.llm.vocab_size else "")
        added = f", added {', '.join(self.added_tokens)}" if self.added_tokens else ""
        return (f"{c.vision.family} {c.vision.image_size}px/{c.vision.patch_size} "
                f"({self._image_tokens()}) + {c.projector.kind} + {c.llm.family} "
                f"{c.llm.num_layers}x{c.llm.hidden_size}; <image> id {c.image_token_id}"
                f"{grown}{added}; template {self.template}")

    def _image_tokens(self) -> str:
        c = self.cfg
        if c.anyres:
            return (f"any resolution: up to {c.max_views} views of {c.view_tokens} tokens, "
                    f"{len(c.image_grid_pinpoints)} grids")
        return f"{c.image_tokens} image tokens"


# --------------------------------------------------------------------------- resolve


def resolve(tc, workdir: Path | None = None) -> ModelSpec:
    """The model of a run: read back from its work dir on resume, else resolved (above)."""
    if workdir is not None and (Path(workdir) / MODEL_FILE).is_file():
        return read(workdir)
    stage1 = stage1_dir(tc.init.stage1_checkpoint)
    if stage1 is not None and (stage1 / MODEL_FILE).is_file():
        base = read(stage1)
        base.cfg = tc.llava.with_aspect(base.cfg)
        if tc.model != AUTO:
            preset = presets.get(tc.model)
            if preset.anyres and not base.cfg.anyres:  # stage 2 adds any resolution
                base.cfg = dataclasses.replace(
                    base.cfg, image_grid_pinpoints=preset.image_grid_pinpoints)
            _check_equal(preset, base.cfg, f"preset {tc.model!r}",
                         f"the stage-1 run {stage1}")
        if tc.tokenizer:
            _check_same_tokenizer(load_tokenizer(tc.tokenizer), base.tokenizer, tc.tokenizer,
                                  stage1)
        return dataclasses.replace(base, template=_template(tc.data.template, base.cfg,
                                                            base.tokenizer))
    sources = {k: getattr(tc.init, k) for k in ("hf_llava", "hf_vision", "hf_llm")
               if getattr(tc.init, k)}
    if tc.model == AUTO:
        spec = from_towers(tc.init, tc.llava, tc.tokenizer)
    else:
        preset = presets.get(tc.model)
        if not isinstance(preset, LlavaConfig):
            raise ConfigError(f"model {tc.model!r} is a tower preset, not a LLaVA model")
        if sources and not tc.init.random:
            spec = from_towers(tc.init, tc.llava, tc.tokenizer)
            if preset.anyres and not spec.cfg.anyres:
                spec.cfg = dataclasses.replace(
                    spec.cfg, image_grid_pinpoints=preset.image_grid_pinpoints)
            _check_equal(preset, spec.cfg, f"preset {tc.model!r}",
                         "the HF configs of " + " + ".join(sources.values()))
        else:
            spec = _from_preset(preset, tc)
    spec.sources = sources
    spec.template = _template(tc.data.template, spec.cfg, spec.tokenizer)
    return spec


def stage1_dir(path: str) -> Path | None:
    """The work dir of `init.stage1_checkpoint` (given as the work dir or its checkpoints/)."""
    if not path:
        return None
    p = Path(path)
    return p.parent if p.name == "checkpoints" and not (p / MODEL_FILE).exists() else p


def from_towers(init, compose: ComposeConfig, tokenizer_dir: str = "") -> ModelSpec:
    """The LLaVA config the HF weight sources describe, with the tokenizer it needs."""
    if init.hf_llava:
        cfg = llava_from_hf(Checkpoint(init.hf_llava).config(), init.hf_llava)
        tokenizer = load_tokenizer(tokenizer_dir or init.hf_llava)
        have = tokenizer.convert_tokens_to_ids(IMAGE)
        if have != cfg.image_token_id:
            raise ConfigError(f"{init.hf_llava}: the tokenizer's {IMAGE} is id {have}, the "
                              f"model's image_token_index is {cfg.image_token_id}")
        return ModelSpec(compose.with_aspect(cfg), tokenizer, "")
    if not (init.hf_vision and init.hf_llm):
        raise ConfigError(
            "model='auto' builds the model from Hugging Face weights: set init.hf_vision and "
            "init.hf_llm (separate towers) or init.hf_llava (a LLaVA checkpoint), or "
            "init.stage1_checkpoint (a stage-1 work dir); or name a preset with model=...")
    vision = from_hf(Checkpoint(init.hf_vision).config(), init.hf_vision)
    llm = from_hf(Checkpoint(init.hf_llm).config(), init.hf_llm)
    if not isinstance(vision, VisionConfig):
        raise ConfigError(f"init.hf_vision {init.hf_vision} holds a language model, not a "
                          "vision tower (CLIPVisionModel, SiglipVisionModel)")
    if not isinstance(llm, LLMConfig):
        raise ConfigError(f"init.hf_llm {init.hf_llm} does not hold a causal LM "
                          "(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)")
    tokenizer = load_tokenizer(tokenizer_dir or init.hf_llm)
    added = add_tokens(tokenizer, compose.image_token)
    vocab = max(llm.vocab_size, _round_up(len(tokenizer), compose.vocab_multiple))
    cfg = LlavaConfig(
        vision=vision, llm=dataclasses.replace(llm, vocab_size=vocab),
        projector=ProjectorConfig(compose.projector),
        image_token_id=tokenizer.convert_tokens_to_ids(compose.image_token),
        vision_feature_layer=compose.vision_feature_layer,
        vision_feature_select=_feature_select(compose.vision_feature_select, vision))
    cfg = compose.with_aspect(cfg)
    cfg.validate()
    return ModelSpec(cfg, tokenizer, "", added, llm.vocab_size)


def _feature_select(select: str, vision: VisionConfig) -> str:
    if select == AUTO:
        return "default" if vision.has_cls else "full"
    return select


def _from_preset(preset: LlavaConfig, tc) -> ModelSpec:
    where = tc.tokenizer or tc.init.hf_llava or tc.init.hf_llm
    if not where:
        raise ConfigError(f"model {tc.model!r}: set tokenizer (a tokenizer directory)")
    tokenizer = load_tokenizer(where)
    added = add_tokens(tokenizer, IMAGE, pad=False)
    have = tokenizer.convert_tokens_to_ids(IMAGE)
    if have != preset.image_token_id or len(tokenizer) > preset.llm.vocab_size:
        raise ConfigError(
            f"the tokenizer {where} ({len(tokenizer)} tokens, {IMAGE} id {have}) does not fit "
            f"preset {tc.model!r} (vocabulary {preset.llm.vocab_size}, {IMAGE} id "
            f"{preset.image_token_id})")
    return ModelSpec(tc.llava.with_aspect(preset), tokenizer, "", added)


def add_tokens(tokenizer, image_token: str = IMAGE, pad: bool = True) -> tuple[str, ...]:
    """Adds the image token (special, never split or normalised) and, when the tokenizer has
    none, a pad token, as llava-hf's conversion does. Returns what was added."""
    added = [image_token] if add_image_token(tokenizer, image_token) else []
    if pad and tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        added.append("<pad>")
    return tuple(added)


def _template(name: str, cfg: LlavaConfig, tokenizer) -> str:
    return templates.default_template(cfg.llm.family, tokenizer) if name == AUTO else name


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


# --------------------------------------------------------------------------- checks


def differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    """(field, a's value, b's value) for every leaf field where two configs differ."""
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        out = []
        for f in dataclasses.fields(a):
            out += differences(getattr(a, f.name), getattr(b, f.name), prefix + f.name + ".")
        return out
    if isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-6 * abs(a):
        return []
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        same = len(a) == len(b) and not any(differences(x, y) for x, y in zip(a, b))
        return [] if same else [(prefix[:-1], a, b)]
    return [] if a == b else [(prefix[:-1], a, b)]


def _check_equal(want: LlavaConfig, have: LlavaConfig, want_name: str, have_name: str):
    diff = differences(want, have)
    if diff:
        fields = "; ".join(f"{k}: {x!r} vs {y!r}" for k, x, y in diff)
        raise ConfigError(f"{want_name} differs from {have_name} in {len(diff)} field(s): "
                          f"{fields} (use model='auto' to take the model from the weights)")


def _check_same_tokenizer(tok, saved, where: str, stage1: Path) -> None:
    if tok.get_vocab() != saved.get_vocab():
        raise ConfigError(f"tokenizer {where} differs from the stage-1 run's "
                          f"({stage1 / TOKENIZER_DIR}); leave tokenizer unset in stage 2")


# --------------------------------------------------------------------------- save / read


def save(spec: ModelSpec, workdir: Path) -> None:
    """`WORKDIR/model.json` and `WORKDIR/tokenizer/`, each written under a temporary name
    and renamed, so a work dir never holds half of either."""
    workdir = Path(workdir)
    tmp = workdir / (TOKENIZER_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_tokenizer(spec.tokenizer, tmp)
    shutil.rmtree(workdir / TOKENIZER_DIR, ignore_errors=True)
    os.replace(tmp, workdir / TOKENIZER_DIR)
    record = {"format": FORMAT, "config": dataclasses.asdict(spec.cfg), "template": spec.template,
              "added_tokens": list(spec.added_tokens), "base_vocab": spec.base_vocab,
              "sources": spec.sources}
    path = workdir / MODEL_FILE
    path.with_suffix(".json.tmp").write_text(json.dumps(record, indent=2))
    os.replace(path.with_suffix(".json.tmp"), path)


def read(workdir: str | Path) -> ModelSpec:
    """The model a work dir saved (its config, tokenizer and template)."""
    workdir = Path(workdir)
    record = json.loads((workdir / MODEL_FILE).read_text())
    cfg = configlib.from_saved(LlavaConfig, record["config"])
    if record.get("format", 1) < 2 and not cfg.vision.has_cls:
        # format 1 kept every patch of a tower without CLS under "default"
        cfg = dataclasses.replace(cfg, vision_feature_select="full")
    tokenizer = load_tokenizer(workdir / TOKENIZER_DIR)
    return ModelSpec(cfg, tokenizer, record["template"], tuple(record.get("added_tokens", ())),
                  int(record.get("base_vocab", 0)), dict(record.get("sources", {})))
