"""Build throughput: the in-process build and the Beam build with 1 and 2 workers, on the same
inputs in one run.

    python -m data_pipelines.benchmark [--samples 4000] [--tars 8] [--max-side 336]

The inputs are img2dataset-style WebDataset tars (KEY.jpg + KEY.txt) of real photos
(scikit-image's, at 640x480 with a per-sample tint, so no two images are the same bytes),
built with `--max-side` (decode, resize, JPEG re-encode: the work of a real stage-1
conversion). Beam runs Beam's DirectRunner in multi_processing mode with
--direct_num_workers 1 and 2. Each build writes its own output; the records are checked
equal across the three. Samples/s counts input samples over the wall time of the whole
build (start-up included).

Goal (issue: Beam): Beam with 2 workers at least 1.6x Beam with 1 worker on this 2-core
machine. The per-worker rate says how many workers a conversion needs: CC-12M's 12.4M
samples in an hour need 12.4M / 3600 / rate workers.
"""
from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.convert import main as convert_main
from data_pipelines.report import iter_samples


def make_tars(root: Path, samples: int, tars: int) -> list[Path]:
    from skimage import data as photos  # the test extra: a few real photos

    base = [Image.fromarray(getattr(photos, n)()).convert("RGB").resize((640, 480))
            for n in ("astronaut", "chelsea", "coffee", "rocket")]
    paths = []
    per = -(-samples // tars)
    for t in range(tars):
        path = root / f"{t:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(t * per, min(samples, (t + 1) * per)):
                tint = np.asarray(base[i % 4], np.int16) + (i % 97) - 48
                buf = io.BytesIO()
                Image.fromarray(np.clip(tint, 0, 255).astype(np.uint8)).save(
                    buf, format="JPEG", quality=90)
                for name, data in ((f"{i:08d}.jpg", buf.getvalue()),
                                   (f"{i:08d}.txt", f"photo number {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def timed(tars, out: Path, max_side: int, extra: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    manifest = convert_main(["webdataset", *map(str, tars), "--out", str(out), "--no-progress",
                             "--max-side", str(max_side), *extra])
    return time.perf_counter() - t0, manifest


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--tars", type=int, default=8)
    parser.add_argument("--max-side", type=int, default=336)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tars = make_tars(root, args.samples, args.tars)
        beam = ["--runner", "direct", "--direct_running_mode", "multi_processing"]
        runs = {"in process": [], "Beam, 1 worker": [*beam, "--direct_num_workers", "1"],
                "Beam, 2 workers": [*beam, "--direct_num_workers", "2"]}
        figures, records = {}, {}
        for k, (label, extra) in enumerate(runs.items()):
            seconds, manifest = timed(tars, root / f"out{k}", args.max_side, extra)
            figures[label] = {"seconds": seconds, "samples": manifest["inputs"],
                              "per_s": manifest["inputs"] / seconds}
            records[label] = sorted(r["id"] for r in iter_samples(root / f"out{k}"))
        same = len({tuple(v) for v in records.values()}) == 1
    print(f"{args.samples} samples in {args.tars} WebDataset tars, --max-side {args.max_side}")
    print(f"{'':18s}{'seconds':>9s}{'samples/s':>11s}{'per worker':>12s}")
    for label, f in figures.items():
        workers = 2 if "2 workers" in label else 1
        print(f"{label:18s}{f['seconds']:9.1f}{f['per_s']:11.1f}{f['per_s'] / workers:12.1f}")
    ratio = figures["Beam, 2 workers"]["per_s"] / figures["Beam, 1 worker"]["per_s"]
    print(f"Beam 2 workers / 1 worker: {ratio:.2f}x; the same records in all three: {same}")
    rate = figures["Beam, 2 workers"]["per_s"] / 2
    print(f"CC-12M (12.4M samples) in one hour at {rate:.0f} samples/s per worker: "
          f"{12.4e6 / 3600 / rate:.0f} workers")
    print(f"[{'met' if ratio >= 1.6 else 'MISSED'}] Beam on 2 workers >= 1.6x Beam on 1")
    return {"figures": figures, "ratio": ratio, "same_records": same}


if __name__ == "__main__":
    main()
