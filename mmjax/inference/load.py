"""A model to generate with: from a local Hugging Face LLaVA directory or a training work dir.

Either way the result is the network (unscanned, LoRA merged, in the inference dtype, with
the attention kernel `mmjax.models.runtime` resolves for the platform, as training does) with
its parameters placed on an inference mesh, the tokenizer, and the conversation template
the model expects.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from mmjax.data.image import ImageAspect, ImageError, blank_pixels, load_rgb, tower_pixels
from mmjax.data.templates import IMAGE, VIDEO, get_template
from mmjax.data.tokenize import ConversationEncoder
from mmjax.data.video import FRAMES, read_frames
from mmjax.data.views import model_images, video_views
from mmjax.errors import ConfigError, UsageError
from mmjax.hf import load as hf_load
from mmjax.hf import load_tokenizer
from mmjax.hf.config import architecture, image_aspect
from mmjax.hf.config import from_hf as config_from_hf
from mmjax.hf.weight_files import Checkpoint
from mmjax.inference.engine import Engine
from mmjax.models import Llava
from mmjax.models.anyres import ImageViews
from mmjax.models.config import LlavaConfig
from mmjax.models.runtime import for_inference
from mmjax.sharding import LOGICAL_AXIS_RULES, make_mesh
from mmjax.training.saved_run import SavedRun, inference_params_fn, parse

RAW = "raw"  # the prompt is given as the model's text, each <image> expanded


@dataclasses.dataclass
class Loaded:
    model: Llava
    params: dict
    tokenizer: object
    template: str  # a template name, or 'raw'
    model_id: str
    mesh: object
    rules: tuple
    image_aspect: ImageAspect = "pad"  # how images are brought to the tower's square
    # (an any-resolution model: its views, whatever this says)
    cache_dtype: str | None = None  # the engine's KV cache type (None: the compute dtype)

    @property
    def cfg(self) -> LlavaConfig:
        return self.model.cfg

    def encoder(self) -> ConversationEncoder | None:
        """The conversation encoder of the template (None for 'raw' prompts)."""
        if self.template == RAW:
            return None
        return ConversationEncoder(self.tokenizer, get_template(self.template, self.tokenizer),
                                   0 if self.cfg.anyres else self.cfg.image_tokens,
                                   self.cfg.image_token_id, 1 << 30, special_token_text="keep",
                                   video_token_id=self.cfg.video_token_id)

    def stop_ids(self) -> list[int]:
        return stop_ids(self.tokenizer, self.template)

    def engine(self, on_compile=None) -> Engine:
        """The KV-cache engine over these parameters, on this mesh (`on_compile` is told
        what compiles)."""
        return Engine(self.model, self.params, self.tokenizer, mesh=self.mesh, rules=self.rules,
                      stop_ids=self.stop_ids(), on_compile=on_compile,
                      cache_dtype=self.cache_dtype)

    def pixels(self, image: str | Path | bytes | Image.Image | np.ndarray,
               blank: bool = False, max_pixels: int | None = None) -> np.ndarray | ImageViews:
        """An image (a file, encoded bytes, a PIL image or an array) -> uint8 [S, S, 3] at
        the tower's size, brought to its square as the run did; for an any-resolution model
        the whole image, uint8 [H, W, 3] (`model_images` makes its views, which depend on
        the conversation). `blank`: the tower's mean colour instead (the blind baseline; one
        tower-sized square). Raises ImageError for an unusable image (one of more than
        `max_pixels` among them)."""
        v, cfg = self.cfg.vision, self.cfg
        extra = {} if max_pixels is None else {"max_pixels": max_pixels}
        if not cfg.anyres:
            return tower_pixels(image, v.image_size, v.image_mean, self.image_aspect,
                                blank=blank, **extra)
        if blank:
            return blank_pixels(v.image_size, v.image_mean)
        return np.asarray(load_rgb(image, **extra), np.uint8)

    def video(self, source: str | Path | bytes, frames: int = FRAMES, fps: float = 1.0,
              max_pixels: int | None = None):
        """A video (a file or its bytes) -> its views, frames sampled as mmjax.data.video
        samples them (at most the model's views per slot). ImageError when unusable."""
        if self.cfg.video_token_id < 0:
            raise ImageError("corrupt_video", f"{self.model_id} takes no video (LLaVA-"
                             "OneVision models do)")
        extra = {} if max_pixels is None else {"max_pixels": max_pixels}
        return video_views(read_frames(source, min(frames, self.cfg.max_views), fps,
                                       **extra), self.cfg)

    def read_video(self, path: str | Path, frames: int = FRAMES, fps: float = 1.0):
        """`video` of a file named on a command line (UsageError when unusable)."""
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"video {path} does not exist")
        try:
            return self.video(path, frames, fps)
        except ImageError as e:
            raise UsageError(f"video {path}: {e}") from None

    def model_images(self, images) -> list:
        """One conversation's images (as `pixels` gives them) as the engine takes them: as
        they are, or an any-resolution model's views (mmjax.data.views)."""
        return model_images(images, self.cfg) if self.cfg.anyres else list(images)

    def image_tokens(self, images) -> list[int]:
        """How many LLM tokens each of `images` (as `model_images` gives them) takes."""
        return [im.tokens if isinstance(im, ImageViews) else self.cfg.image_tokens
                for im in images]

    def read_image(self, path: str | Path) -> np.ndarray:
        """`pixels` of an image file named on a command line (UsageError when unusable)."""
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"image {path} does not exist")
        try:
            return self.pixels(path)
        except ImageError as e:
            raise UsageError(f"image {path}: {e}") from None

    def raw_prompt_ids(self, text: str, image_tokens=None) -> np.ndarray:
        """The prompt text tokenized as given (with the tokenizer's BOS), each <image> (and
        <video>) expanded to its tokens (`image_tokens[k]` for the k-th placeholder;
        default: one view's)."""
        ids: list[int] = []
        pieces = re.split(f"({IMAGE}|{VIDEO})" if self.cfg.video_token_id >= 0 else
                          f"({IMAGE})", text)
        for k, piece in enumerate(pieces[::2]):
            if k:
                n = self.cfg.image_tokens if image_tokens is None else (
                    image_tokens[k - 1] if k - 1 < len(image_tokens) else 0)
                media = self.cfg.video_token_id if pieces[2 * k - 1] == VIDEO else \
                    self.cfg.image_token_id
                ids += [media] * n
            ids += self.tokenizer.encode(piece, add_special_tokens=k == 0)
        return np.asarray(ids, np.int32)


def stop_ids(tokenizer, template: str) -> list[int]:
    """What ends a reply: the tokenizer's EOS and the template's end-of-turn token."""
    ids = [tokenizer.eos_token_id]
    if template != RAW:
        eot = get_template(template, tokenizer).end_of_turn
        if eot:
            ids.append(tokenizer.convert_tokens_to_ids(eot))
    return [i for i in ids if i is not None]


def inference_mesh(cfg: LlavaConfig, devices=None):
    """All devices: the key/value heads split over 'tensor' as far as they divide, the rest
    over 'data' (rows)."""
    devices = list(jax.devices() if devices is None else devices)
    tensor = math.gcd(len(devices), cfg.llm.num_kv_heads)
    return make_mesh({"data": len(devices) // tensor, "fsdp": 1, "tensor": tensor}, devices)


def from_hf(directory: str | Path, dtype: str | None = None, template: str = "auto",
            devices=None) -> Loaded:
    """A LLaVA checkpoint directory (LlavaForConditionalGeneration layout) with its
    tokenizer, split by the standard logical-axis rules (an HF directory has no config)."""
    directory = Path(directory)
    hf_config = Checkpoint(directory).config()
    arch = architecture(hf_config, str(directory / "config.json"))
    if "Llava" not in arch:
        raise ConfigError(f"{directory} holds a {arch}, not a LLaVA model "
                          "(LlavaForConditionalGeneration)")
    cfg = config_from_hf(hf_config, directory)
    mesh, rules = inference_mesh(cfg, devices), LOGICAL_AXIS_RULES
    rt = for_inference(mesh.devices.flat[0], dtype)
    imported = hf_load(directory, rt, mesh, rules)
    tokenizer = load_tokenizer(directory)
    if template == "auto":
        template = "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"
    return Loaded(imported.model, imported.params, tokenizer, template, directory.name, mesh,
                  rules, image_aspect=image_aspect(directory))


def from_checkpoint(spec: str, dtype: str | None = None, template: str = "auto",
                    devices=None, merge_lora: bool = True) -> Loaded:
    """A training work dir's parameters only (the newest checkpoint, or STEP; no optimizer
    state is read), placed on an inference mesh over `devices`, with the model, tokenizer
    and template the run saved (`WORKDIR/model.json`, `WORKDIR/tokenizer/`); LoRA adapters
    merged into the kernels unless `merge_lora` is False."""
    workdir, step = parse(spec)
    run = SavedRun.open(workdir)
    mesh = inference_mesh(run.cfg, devices)
    rules = run.tc.logical_axis_rules or LOGICAL_AXIS_RULES
    rt = for_inference(mesh.devices.flat[0], dtype, trained=run.rt, keep_lora=not merge_lora)
    convert = inference_params_fn(run.cfg, run.rt, rt, mesh, rules, donate=True)
    params = convert(run.read_params(step, mesh, rules))
    return Loaded(Llava(run.cfg, rt), params, run.spec.tokenizer,
                  run.spec.template if template == "auto" else template,
                  f"{workdir.name}" + (f":{step}" if step is not None else ""), mesh, rules,
                  image_aspect=run.tc.data.image_aspect)


def load(hf: str | None = None, checkpoint: str | None = None, **kwargs) -> Loaded:
    if bool(hf) == bool(checkpoint):
        raise ConfigError("pass one of --hf DIR or --checkpoint WORKDIR[:STEP]")
    return from_hf(hf, **kwargs) if hf else from_checkpoint(checkpoint, **kwargs)
