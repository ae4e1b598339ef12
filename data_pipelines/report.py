"""A report per built dataset, written beside its shards: what to look at before spending a
pod-day on the data.

    python -m data_pipelines.report DIR [--tokenizer TOK [--template vicuna_v1]]
                                        [--image-tokens 576]

report.json (all numbers), report.md (the same, readable) and report_lengths.png (histograms
of sample length in tokens, with and without image tokens): samples per source, skipped
records by reason (from manifest.json), token lengths, image sizes, turns per conversation.
With a tokenizer, lengths are the training encoder's (`mmjax.data.tokenize`, the template's
full layout) and the report records the encoding version they were made with; samples the
encoder refuses are counted by reason. Without one, lengths are word-based estimates of the
message text and say so.
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np

from data_pipelines.adapt import approx_tokens
from mmjax.data.sources import ArrayRecordSource
from mmjax.data.templates import ConversationError, get_template, normalize_turns
from mmjax.data.tokenize import ENCODING_VERSION, ConversationEncoder
from mmjax.hf import load_tokenizer


def iter_samples(out: Path | str):
    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        path = out / shard
        if shard.endswith(".jsonl"):
            for line in path.read_text(encoding="utf-8").splitlines():
                yield json.loads(line)
        else:
            src = ArrayRecordSource([path])
            for i in range(len(src)):
                rec = src[i]
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}: record {i} is unreadable ({rec.detail})")
                yield rec


def _stats(values) -> dict:
    if not len(values):
        return {"count": 0}
    a = np.asarray(values)
    return {"count": int(a.size), "mean": round(float(a.mean()), 1), "min": int(a.min()),
            "p50": int(np.percentile(a, 50)), "p90": int(np.percentile(a, 90)),
            "p99": int(np.percentile(a, 99)), "max": int(a.max())}


def compute(out: Path, tokenizer_dir: str | None = None, image_tokens: int = 576,
            template: str = "vicuna_v1") -> dict:
    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text())
    encoder = None
    if tokenizer_dir:
        tok = load_tokenizer(tokenizer_dir)
        # image tokens are counted apart; a placeholder id outside the vocabulary
        encoder = ConversationEncoder(tok, get_template(template, tok), 1, -1, 1 << 30)
    per_source, unencodable = collections.Counter(), collections.Counter()
    text_len, full_len, widths, heights, turns, images_per = [], [], [], [], [], []
    for rec in iter_samples(out):
        per_source[rec.get("source", "")] += 1
        n_images = len(rec.get("image_wh", []))
        if encoder is not None:
            try:
                n = len(encoder.encode(*normalize_turns(rec["conversations"]),
                                       n_images).input_ids) - n_images
            except ConversationError as e:
                unencodable[e.reason] += 1
                continue
        else:
            text = "\n".join(t["value"].replace("<image>", "") for t in rec["conversations"])
            n = approx_tokens(text)
        text_len.append(n)
        full_len.append(n + n_images * image_tokens)
        for w, h in rec.get("image_wh", []):
            widths.append(w)
            heights.append(h)
        images_per.append(n_images)
        turns.append(sum(1 for t in rec["conversations"] if t["from"] == "gpt"))
    report = {
        "name": manifest["name"], "samples": manifest["samples"], "inputs": manifest["inputs"],
        "per_source": dict(sorted(per_source.items())),
        "skipped": manifest["skipped"],
        "skipped_share": round(sum(manifest["skipped"].values()) / max(manifest["inputs"], 1), 4),
        "length_unit": (f"tokens ({template})" if encoder else
                        "approx. tokens (1.3 x words; pass --tokenizer)"),
        "encoding_version": ENCODING_VERSION if encoder else None,
        "unencodable": dict(sorted(unencodable.items())),
        "tokens_text": _stats(text_len), "tokens_with_images": _stats(full_len),
        "image_tokens_per_image": image_tokens,
        "image_width": _stats(widths), "image_height": _stats(heights),
        "images_per_sample": dict(sorted(collections.Counter(images_per).items())),
        "turns_per_conversation": dict(sorted(collections.Counter(turns).items())),
    }
    report["_lengths"] = (text_len, full_len)
    return report


def write_report(out: Path, tokenizer_dir: str | None = None, image_tokens: int = 576,
                 template: str = "vicuna_v1") -> dict:
    out = Path(out)
    report = compute(out, tokenizer_dir, image_tokens, template)
    text_len, full_len = report.pop("_lengths")
    histogram_png(out / "report_lengths.png", {"text only": text_len,
                                               "with image tokens": full_len},
                  report["length_unit"])
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    report["path"] = str(out / "report.md")
    return report


def markdown(r: dict) -> str:
    lines = [f"# {r['name']}", "", f"{r['samples']} samples from {r['inputs']} inputs; "
             f"{sum(r['skipped'].values())} skipped ({r['skipped_share']:.2%}).", "",
             "## Samples per source", ""]
    lines += [f"- {k or '(none)'}: {v}" for k, v in r["per_source"].items()]
    lines += ["", "## Skipped by reason", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(r["skipped"].items())] or ["- none"]
    lines += ["", f"## Length ({r['length_unit']})", "", "| | count | mean | min | p50 | p90 | "
              "p99 | max |", "|---|---|---|---|---|---|---|---|"]
    for key, label in (("tokens_text", "text only"),
                       ("tokens_with_images",
                        f"with {r['image_tokens_per_image']} tokens per image")):
        s = r[key]
        if s["count"]:
            lines.append(f"| {label} | {s['count']} | {s['mean']} | {s['min']} | {s['p50']} | "
                         f"{s['p90']} | {s['p99']} | {s['max']} |")
    lines += ["", "![lengths](report_lengths.png)", "", "## Images", ""]
    for key in ("image_width", "image_height"):
        s = r[key]
        if s["count"]:
            lines.append(f"- {key.split('_')[1]}: p50 {s['p50']}, min {s['min']}, "
                         f"max {s['max']}")
    lines.append(f"- images per sample: {r['images_per_sample']}")
    lines += ["", "## Turns per conversation", "", f"{r['turns_per_conversation']}", ""]
    return "\n".join(lines)


def histogram_png(path: Path, series: dict[str, list[int]], unit: str, bins: int = 40,
                  size=(720, 300 * 2)) -> None:
    """Stacked panels of bar histograms, drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    panel_h = h // max(len(series), 1)
    colours = [(66, 118, 181), (214, 120, 46)]
    for k, (label, values) in enumerate(series.items()):
        top = k * panel_h
        left, right, bottom = 60, w - 20, top + panel_h - 40
        draw.text((left, top + 8), f"{label}: {len(values)} samples ({unit})", fill="black")
        if not values:
            continue
        counts, edges = np.histogram(values, bins=bins)
        peak = max(int(counts.max()), 1)
        bar_w = (right - left) / bins
        for i, c in enumerate(counts):
            x0 = left + i * bar_w
            y0 = bottom - (bottom - top - 30) * c / peak
            draw.rectangle([x0, y0, x0 + bar_w - 1, bottom], fill=colours[k % 2])
        draw.line([left, bottom, right, bottom], fill="black")
        for i in (0, bins // 2, bins):
            x = left + i * bar_w
            draw.text((x - 10, bottom + 5), f"{int(edges[i])}", fill="black")
        draw.text((5, top + 30), f"{peak}", fill="black")
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_pipelines.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--tokenizer")
    p.add_argument("--template", default="vicuna_v1",
                   help="the training template the lengths are counted with (with --tokenizer)")
    p.add_argument("--image-tokens", type=int, default=576)
    args = p.parse_args(argv)
    r = write_report(Path(args.dir), args.tokenizer, args.image_tokens, args.template)
    print((Path(args.dir) / "report.md").read_text())
    return r


if __name__ == "__main__":
    main()
