"""The embedded demo (no downloads): a tiny LLaVA on a real photo, sharded over all devices.

    python -m mmjax.demo [--workdir /tmp/mmjax-demo]          (what `make demo` runs)
    python -m mmjax.demo --forward [--config configs/model.py:tiny] [--config.mesh.tensor=2]

By default it generates a dataset of coloured shapes (captions for stage 1; short-answer
questions with LLaVA's format prompt, multi-turn and counting for stage 2), trains a BPE
tokenizer and a tiny ViT + LLM from scratch through `mmjax.train` (stage 1, then stage 2
from stage 1's checkpoint). Stage 2 evaluates itself during training
(`evaluate_during_training`: validation loss on held-out instructions; short answers in seen
and held-out phrasings, with blank images, and conversational answers without the format
prompt, on unseen images); the demo reports what the last evaluation measured, writes
WORKDIR/report.json, and exits non-zero when a goal is missed.

Ablations (optional; each adds one stage 2, about a minute and a half on 2 cores):
`--ablation format` trains stage 2 on short answers without the format prompt (does the
prompt control the answer's form?); `--ablation stage1` trains the same stage 2, same steps
and data, from the stage-1 initialisation left untrained (does stage 1's alignment let stage
2 learn?); `--ablation all` runs both. Each is reported beside the main run.

`--forward` shows the foundation alone: it trains a small BPE
tokenizer on a few LLaVA-style prompts, builds a tiny random LLaVA (CLIP-style tower,
mlp2x_gelu projector, Llama decoder), preprocesses the bundled photo the LLaVA-1.5 way
(pad to square with the tower's mean colour, resize, normalise), splices its image tokens
into a vicuna-style prompt, and runs the jitted forward on a data x fsdp x tensor mesh over
every device, checking it against the unsharded forward. It prints shapes and logit stats.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mmjax import compile_cache, configlib
from mmjax.data.image import preprocess
from mmjax.data.synthetic import vocabulary_text, write_split
from mmjax.data.templates import VICUNA_SYSTEM
from mmjax.data.tokenizer_training import train_bpe_tokenizer
from mmjax.evaluation import during_training
from mmjax.models import Llava, presets
from mmjax.models.config import RuntimeConfig
from mmjax.models.factory import count_params
from mmjax.sharding import batch_sharding, logical_shardings, make_mesh, mesh_rules
from mmjax.training import run
from mmjax.training.config import from_config

PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
          "USER: <image>\nWhat animal is in the picture? Answer the question using a single "
          "word or phrase. ASSISTANT:")


CONFIGS = configlib.configs_dir()
CONFIG = CONFIGS / "model.py"


def forward_demo(argv=None) -> dict:
    """A sharded forward pass of a tiny random LLaVA on the bundled photo."""
    parser = argparse.ArgumentParser(description="forward pass demo")
    parser.add_argument("--config", default=str(CONFIG), help="config file[:variant]")
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)

    t0 = time.time()
    config = configlib.load(args.config, overrides)
    cfg = presets.get(config.model)
    rt = configlib.typed(RuntimeConfig, config.runtime, "runtime")
    rules = configlib.tuples(config.logical_axis_rules)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_bpe_tokenizer([PROMPT, "A cat.", "cat", "dog", "bird"] * 10,
                                  vocab_size=cfg.llm.vocab_size - 8, out_dir=tmp)
    # The tokenizer's <image> token is the model's image token; it expands to one token per
    # image patch feature before the forward.
    cfg = dataclasses.replace(cfg, image_token_id=tok.convert_tokens_to_ids("<image>"))
    ids = []
    for t in tok(PROMPT)["input_ids"]:
        ids += [t] * (cfg.image_tokens if t == cfg.image_token_id else 1)
    photo = Image.open(resources.files("mmjax.assets") / "chelsea.jpg")
    v = cfg.vision
    pixels = preprocess(photo, v.image_size, v.image_mean, v.image_std, aspect="pad")

    mesh = make_mesh(dict(config.mesh))
    batch = mesh.shape["data"] * mesh.shape["fsdp"]
    input_ids = np.tile(np.asarray(ids)[None], (batch, 1))
    pixel_values = np.tile(pixels[None, None], (batch, 1, 1, 1, 1))
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}")
    print(f"model: {config.model} (vision {v.family} {v.image_size}px/{v.patch_size}, "
          f"{v.num_layers} layers; LLM {cfg.llm.num_layers} layers, d={cfg.llm.hidden_size}); "
          f"<image> is token {cfg.image_token_id}")
    print(f"photo {photo.size} -> pixels {pixels.shape}, mean {pixels.mean():+.3f}")
    print(f"prompt: {len(ids)} tokens ({cfg.image_tokens} of them image tokens)")

    model = Llava(cfg, rt)
    init = lambda: model.init(jax.random.key(args.seed), jnp.asarray(input_ids[:1]),  # noqa
                              jnp.asarray(pixel_values[:1]))
    boxed = jax.eval_shape(init)["params"]
    shardings = logical_shardings(boxed, mesh, rules)
    with mesh_rules(mesh, rules):
        params = jax.jit(lambda: nn.unbox(init())["params"], out_shardings=shardings)()
        inputs = [jax.device_put(x, batch_sharding(mesh, x.ndim, rules))
                  for x in (input_ids, pixel_values)]
        forward = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x).logits)
        logits = forward(params, *inputs)
    single = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x).logits)(
        jax.device_get(params), jnp.asarray(input_ids[:1]), jnp.asarray(pixel_values[:1]))
    err = float(jnp.max(jnp.abs(logits[:1] - single)))
    last = np.asarray(logits[0, -1])
    stats = {"params": count_params(params), "logits_shape": tuple(logits.shape),
             "logits_mean": float(logits.mean()), "logits_std": float(logits.std()),
             "sharded_vs_unsharded_max_abs_diff": err, "seconds": time.time() - t0}
    embed = params["language_model"]["embed_tokens"]
    print(f"parameters: {stats['params']:,} (embedding sharded as {embed.sharding.spec})")
    print(f"logits {stats['logits_shape']}: mean {stats['logits_mean']:+.4f} std "
          f"{stats['logits_std']:.4f}; next-token argmax {int(last.argmax())} "
          f"({tok.decode([int(last.argmax())])!r}, an untrained model)")
    print(f"sharded forward vs single device: max |diff| {err:.2e}")
    print(f"done in {stats['seconds']:.1f}s")
    if err > 1e-4:
        raise SystemExit(f"sharded and unsharded forward disagree ({err:.2e})")
    return stats


CHANCE = {"colour": 4, "shape": 3, "side": 2, "count": 3}  # answers per kind


def evaluate_during_training(c, data: Path) -> None:
    """The demo's evaluation, in stage 2 every 225 steps: short questions (with the format
    prompt) in seen and held-out phrasings, the same with blank images, and every kind
    without the prompt (answered in sentences), on images the run never saw; and the
    validation loss on 5% of the instructions, held out of training."""
    c.data.holdout_share = 0.05
    c.eval.heldout_batches = 4
    c.eval.every_steps = 225
    c.eval.limit = 0
    c.eval.batch_size = 256
    c.eval.max_new_tokens = 24
    c.eval.examples = 3
    short = {"name": "short_answer", "data": str(data / "heldout_qa.json")}
    c.eval.benchmarks = [
        {**short, "tag": "short_seen"},
        {**short, "tag": "short_heldout", "data": str(data / "heldout_qa_heldout.json")},
        {**short, "tag": "short_blank", "blank_images": True},
        {**short, "tag": "conversational", "data": str(data / "heldout_conv.json")}]


# The stage-2 runs: work dir -> (training file, starts from stage 1's checkpoint, title)
MAIN = "stage2"
RUNS = {MAIN: ("instruct", True, "stage 2"),
        "stage2_no_format_prompt": ("instruct_noprompt", True,
                                    "stage 2, ablation: no format prompt in training"),
        "stage2_no_stage1": ("instruct", False, "stage 2, ablation: no stage 1 (the stage-1 "
                             "initialisation, untrained)")}
ABLATIONS = {"format": "stage2_no_format_prompt", "stage1": "stage2_no_stage1"}


def stage_config(stage: int, workdir: Path, data: Path, overrides, run_name: str = MAIN):
    """configs/stage{stage}.py:demo on the demo data; for stage 2, the run `run_name` of
    RUNS. Without stage 1 the demo config's `init.random` draws every part (the same seed
    and model as stage 1's initialisation) and the vision tower stays frozen as ever."""
    c = configlib.load(f"{CONFIGS}/stage{stage}.py:demo", list(overrides))
    c.tokenizer = str(data / "tokenizer")
    split = "captions" if stage == 1 else RUNS[run_name][0]
    c.data.sources = [{"kind": "llava_json", "path": str(data / f"train_{split}.json"),
                       "image_root": str(data), "weight": 1.0}]
    if stage == 2:
        c.init.stage1_checkpoint = str(workdir / "stage1") if RUNS[run_name][1] else ""
        evaluate_during_training(c, data)
    return c


def _stage(stage: int, workdir: Path, data: Path, overrides, run_name: str = MAIN) -> float:
    """Trains one stage (for stage 2, the run `run_name`); returns its seconds."""
    t0 = time.time()
    c = stage_config(stage, workdir, data, overrides, run_name)
    title = f"stage {stage}" if stage == 1 else RUNS[run_name][2]
    print(f"\n== {title}: trains {[g for g, lr in c.optim.groups if lr]} ==", flush=True)
    run.train(from_config(c), workdir / ("stage1" if stage == 1 else run_name),
              evaluators=during_training.evaluators)
    return time.time() - t0


def last_evaluation(run: Path) -> tuple[int, dict, dict]:
    """(step, {tag: metrics}, {tag: answer lines}) of a run's last in-training evaluation."""
    step = max(int(p.name.removeprefix("step_")) for p in (run / "eval").iterdir())
    where = run / "eval" / f"step_{step}"
    metrics, answers = {}, {}
    for d in sorted(where.iterdir()):
        metrics[d.name] = json.loads((d / "results.json").read_text())["metrics"]
        answers[d.name] = [json.loads(x) for x in (d / "answers.jsonl").read_text().splitlines()]
    return step, metrics, answers


def figures(metrics: dict) -> dict:
    """The demo's claims in numbers, from the four evaluations of configs/stage2.py:demo."""
    seen, held = metrics["short_seen"], metrics["short_heldout"]
    conv, blank = metrics["conversational"], metrics["short_blank"]
    kinds = sorted(CHANCE)
    return {
        "seen_accuracy": seen["accuracy"], "heldout_accuracy": held["accuracy"],
        "blank_accuracy": blank["accuracy"],
        "per_kind": {k: {"seen": seen[f"accuracy/{k}"], "heldout": held[f"accuracy/{k}"],
                         "blank": blank[f"accuracy/{k}"]} for k in kinds},
        "with_prompt_short_share": (seen["short_share"] + held["short_share"]) / 2,
        "with_prompt_accuracy": (seen["accuracy"] + held["accuracy"]) / 2,
        "without_prompt_sentence_share": conv["sentence_share"],
        "without_prompt_fact_accuracy": conv["fact_accuracy"],
        "without_prompt_per_kind": {
            k.removeprefix("fact_accuracy/"): {
                "fact_accuracy": v, "sentence_share": conv[f"sentence_share/"
                                                           f"{k.removeprefix('fact_accuracy/')}"]}
            for k, v in conv.items() if k.startswith("fact_accuracy/")},
    }


def learning_curve(run: Path) -> list[dict]:
    """A run's in-training evaluations in step order: val/loss and short-answer accuracy in
    seen and held-out phrasings and on blank images."""
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "val/loss" in m:  # a resumed run may log a step again: the last one counts
            rows[m["step"]] = {"step": m["step"], "val_loss": m["val/loss"],
                               **{k: m[f"eval/short_{k}/accuracy"]
                                  for k in ("seen", "heldout", "blank")}}
    return [rows[k] for k in sorted(rows)]


def paradigm(main_curve: list[dict], bare_curve: list[dict]) -> dict:
    """Stage 2 with and without stage 1, compared at the last step both evaluated."""
    bare = bare_curve[-1]
    main = next(r for r in main_curve if r["step"] == bare["step"])
    return {"step": bare["step"], "main": main_curve, "no_stage1": bare_curve,
            "at_step": {"main": main, "no_stage1": bare},
            "heldout_gap": main["heldout"] - bare["heldout"],
            "no_stage1_above_blank": bare["heldout"] - bare["blank"]}


def goals(main: dict, chance: float, no_format: dict | None = None,
          par: dict | None = None) -> list[dict]:
    """The demo's pass lines: the seed's claims (phrasings, the format prompt, images read),
    every kind learned, and with the ablations, what each must show."""
    out = [
        ("held-out phrasings: both >= 85%, within 10 points of seen",
         f"seen {main['seen_accuracy']:.1%}, held-out {main['heldout_accuracy']:.1%}",
         min(main["seen_accuracy"], main["heldout_accuracy"]) >= 0.85
         and main["seen_accuracy"] - main["heldout_accuracy"] <= 0.10),
        *((f"{kind}: >= 90% seen and held-out", f"{v['seen']:.1%} / {v['heldout']:.1%}",
           min(v["seen"], v["heldout"]) >= 0.90) for kind, v in main["per_kind"].items()),
        ("with the format prompt: >= 95% single word or phrase",
         f"{main['with_prompt_short_share']:.1%}", main["with_prompt_short_share"] >= 0.95),
        ("without it: >= 90% full sentences", f"{main['without_prompt_sentence_share']:.1%}",
         main["without_prompt_sentence_share"] >= 0.90),
        # what the answers come from: a model that read the words alone would score the
        # same on blank images; one that reads the image knows no better than chance there
        # (below it when it answers outside the answer set, or not at all)
        ("blank images: no better than chance (at most 10 points above)",
         f"{main['blank_accuracy']:.1%} vs chance {chance:.1%}",
         main["blank_accuracy"] - chance <= 0.10)]
    if no_format is not None:
        out.append(("ablation (no format prompt in training): at most half the main run's "
                    "full sentences",
                    f"{no_format['without_prompt_sentence_share']:.1%} vs "
                    f"{main['without_prompt_sentence_share']:.1%}",
                    no_format["without_prompt_sentence_share"]
                    <= 0.5 * main["without_prompt_sentence_share"]))
    if par is not None:
        m, b = par["at_step"]["main"], par["at_step"]["no_stage1"]
        out.append(("training paradigm: held-out accuracy >= 20 points above no stage 1 at "
                    "the same stage-2 step, or no stage 1 within 10 points of its blank "
                    "images",
                    f"step {par['step']}: {m['heldout']:.1%} vs {b['heldout']:.1%} "
                    f"(no stage 1 on blank images {b['blank']:.1%})",
                    par["heldout_gap"] >= 0.20 or par["no_stage1_above_blank"] <= 0.10))
    return [{"goal": g, "measured": m, "met": bool(ok)} for g, m, ok in out]


def print_report(step: int, main: dict, chance: float, no_format: dict | None,
                 answers: dict, no_format_answers: dict | None, goal_rows: list[dict],
                 n_heldout: int, par: dict | None = None) -> None:
    print(f"\n== what stage 2 learned (evaluated in training at step {step}, "
          f"{n_heldout} unseen images) ==")
    print("  short answers (format prompt)   seen phrasings  held-out phrasings  blank images")
    for k, v in main["per_kind"].items():
        print(f"    {k:8s}                      {v['seen']:7.1%}         {v['heldout']:7.1%}"
              f"          {v['blank']:7.1%}")
    print(f"    all                           {main['seen_accuracy']:7.1%}         "
          f"{main['heldout_accuracy']:7.1%}          {main['blank_accuracy']:7.1%}"
          f"   (chance {chance:.1%})")
    cols = "main run" + ("   no format prompt" if no_format else "")
    print(f"\n  answer form                                      {cols}")

    def row(label, key):
        line = f"    {label:46s}{main[key]:7.1%}"
        if no_format:
            line += f"        {no_format[key]:7.1%}"
        print(line)

    row("with the prompt: single word or phrase", "with_prompt_short_share")
    row("with the prompt: accuracy", "with_prompt_accuracy")
    row("without it: full sentences", "without_prompt_sentence_share")
    row("without it: the fact inside the sentence", "without_prompt_fact_accuracy")
    print("\n  without the prompt, per kind (facts right / full sentences)")
    for k, v in main["without_prompt_per_kind"].items():
        print(f"    {k:18s} {v['fact_accuracy']:7.1%} / {v['sentence_share']:7.1%}")
    if par is not None:
        print("\n  training paradigm: stage 2 after stage 1 vs from the untrained stage-1 "
              "initialisation")
        print("    stage-2 step    val/loss            held-out phrasings      blank images")
        print("                    main   no stage 1   main     no stage 1     main     no "
              "stage 1")
        for m, b in zip(par["main"], par["no_stage1"]):
            print(f"    {m['step']:>5d}          {m['val_loss']:6.3f}   {b['val_loss']:6.3f}     "
                  f"{m['heldout']:7.1%}  {b['heldout']:7.1%}       {m['blank']:7.1%}  "
                  f"{b['blank']:7.1%}")
    print("\n  examples")
    for tag, who in (("short_heldout", ""), ("conversational", ""),
                     ("conversational", "(no format prompt) ")):
        lines = (no_format_answers or {}).get(tag, []) if who else answers[tag]
        shown = {}
        for a in lines:  # one per kind
            shown.setdefault(a.get("category", "").split("/")[0], a)
        for a in list(shown.values())[:5 if not who else 2]:
            print(f"    {who}Q: {a['prompt']!r}\n    {who}A: {a['text']!r}")
    print("\n  goals")
    for g in goal_rows:
        print(f"    [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['measured']}")


def training_demo(workdir: Path, n_train: int = 2000, n_heldout: int = 100,
                  overrides: list[str] = (), ablations: tuple[str, ...] = ()) -> dict:
    """Generate shapes data, train a tokenizer, run stage 1, stage 2 and the ablations' stage
    2, report what the stage-2 runs' in-training evaluations measured."""
    t0 = time.time()
    data = workdir / "data"
    size = presets.get("demo").vision.image_size
    write_split(data, "train", n_train, size, seed=1)
    heldout = write_split(data, "heldout", n_heldout, size, seed=2)
    demo = presets.get("demo")
    tok = train_bpe_tokenizer(vocabulary_text() + [VICUNA_SYSTEM, "USER: ASSISTANT:"] * 5,
                              vocab_size=demo.llm.vocab_size, out_dir=data / "tokenizer")
    assert tok.convert_tokens_to_ids("<image>") == demo.image_token_id
    print(f"demo data: {n_train} training and {n_heldout} held-out images in {data}; "
          f"tokenizer of {len(tok)} tokens ({time.time() - t0:.0f}s)", flush=True)
    seconds = {"stage1": _stage(1, workdir, data, overrides)}
    for name in (MAIN, *(ABLATIONS[a] for a in ablations)):
        seconds[name] = _stage(2, workdir, data, overrides, name)
    no_format = no_format_answers = par = None
    if "format" in ablations:
        _, m, no_format_answers = last_evaluation(workdir / ABLATIONS["format"])
        no_format = figures(m)
    if "stage1" in ablations:
        par = paradigm(learning_curve(workdir / MAIN),
                       learning_curve(workdir / ABLATIONS["stage1"]))
    step, metrics, answers = last_evaluation(workdir / MAIN)
    main = figures(metrics)
    items = json.loads(heldout["qa"].read_text())
    chance = float(np.mean([1 / CHANCE[it["kind"]] for it in items]))
    goal_rows = goals(main, chance, no_format, par)
    print_report(step, main, chance, no_format, answers, no_format_answers, goal_rows,
                 n_heldout, par)
    print(f"\n  TensorBoard: tensorboard --logdir {workdir / MAIN / 'tensorboard'} "
          "(val/loss, eval/*, example predictions)")
    wall = time.time() - t0
    report = {"step": step, "heldout_images": n_heldout, "chance": chance, "main": main,
              "ablation_no_format_prompt": no_format, "training_paradigm": par,
              "goals": goal_rows, "seconds": round(wall, 1),
              "seconds_per_run": {k: round(v, 1) for k, v in seconds.items()}}
    (workdir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    runs = ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
    print(f"demo done in {wall:.0f}s ({runs}; report: {workdir / 'report.json'})")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description="The embedded demo: two-stage training of a "
                                     "tiny LLaVA on generated shapes, then what it learned.")
    parser.add_argument("--workdir", default="/tmp/mmjax-demo")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--ablation", nargs="?", const="format",
                        choices=(*ABLATIONS, "all"),
                        help="also train stage 2 without the format prompt (format, the "
                        "default), from the untrained stage-1 initialisation (stage1), or "
                        "both (all), and report each beside the main run")
    parser.add_argument("--forward", action="store_true",
                        help="only the sharded forward pass of a tiny random LLaVA")
    args, overrides = parser.parse_known_args(argv)
    if args.forward:
        return forward_demo(overrides)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    compile_cache.enable()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)  # the demo always starts from scratch
    ablations = {None: (), "all": tuple(ABLATIONS)}.get(args.ablation, (args.ablation,))
    out = training_demo(workdir, args.train_images, overrides=overrides, ablations=ablations)
    missed = [g["goal"] for g in out["goals"] if not g["met"]]
    if missed:
        raise SystemExit("demo goal(s) missed: " + "; ".join(missed))
    return out


if __name__ == "__main__":
    main()
