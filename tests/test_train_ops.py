"""Running training for real: 2 processes x 4 devices give the losses of 1 process x 8
devices; SIGTERM saves a checkpoint and exits 75, and a rerun resumes from it; metrics
(TensorBoard events, MFU, learning rates, data wait), a profiler window; MFU formula."""
import json
import signal
import socket
import struct
import subprocess
import time

import numpy as np
import pytest
from runs import cmd
from runs import env as _env

from mmjax.models import RuntimeConfig, presets
from mmjax.training import flops


def _cmd(workdir, data, steps, extra=()):
    return cmd(workdir, data, steps, ["--config.data.packing=pad",
                                      "--config.data.max_length=96", *extra])


def _losses(workdir):
    return [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_two_processes_of_four_devices_match_one_of_eight(demo_data, tmp_path):
    steps = 3
    one = subprocess.run(_cmd(tmp_path / "one", demo_data, steps), env=_env(8),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    # the data axis spans the two processes over "DCN" (process granules), 4 devices each
    extra = ["--config.mesh_dcn.data=2", "--config.mesh_granule=process"]
    procs = [subprocess.Popen(
        _cmd(tmp_path / "two", demo_data, steps, extra),
        env=_env(4, MMJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MMJAX_NUM_PROCESSES=2,
                 MMJAX_PROCESS_ID=i),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 process(es)" in outs[0][0] and "mesh {'data': 8" in outs[0][0]
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == len(l2) == steps
    np.testing.assert_allclose(l2, l1, rtol=2e-5)
    assert l1[-1] < l1[0]


def _wait_for_steps(workdir, n, proc, timeout=300):
    deadline = time.time() + timeout
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise TimeoutError(f"fewer than {n} steps in {timeout}s")


def _tf_records(path):
    data = path.read_bytes()
    i = 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        yield data[i + 12:i + 12 + n]
        i += 12 + n + 4


def _tensorboard_scalars(directory):
    from tensorboardX.proto import event_pb2

    tags = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for rec in _tf_records(path):
            event = event_pb2.Event.FromString(rec)
            for v in event.summary.value:
                tags.setdefault(v.tag, []).append((event.step, v.simple_value))
    return tags


@pytest.mark.e2e
def test_sigterm_saves_exits_and_resumes_with_metrics(demo_data, tmp_path):
    """SIGTERM mid-run saves at once and exits 75; the rerun resumes from that step. The same
    run checks the metrics: jsonl, TensorBoard events, MFU (with a given peak), a profile."""
    workdir, steps = tmp_path / "run", 16
    cmd = _cmd(workdir, demo_data, steps, ["--config.checkpoint.save_interval=1000",
                                           "--config.metrics.peak_tflops=1.0",
                                           "--config.profile.start_step=1",
                                           "--config.profile.num_steps=2"])
    proc = subprocess.Popen(cmd, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_steps(workdir, 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "preempted at step" in out
    step = int(out.split("preempted at step ")[1].split(":")[0])
    assert 4 <= step < steps
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [step]  # saved on the notice, not on the (1000-step) interval
    assert "mfu" in out and "tok/s" in out and "eta" in out
    assert list((workdir / "profile").rglob("*.xplane.pb")), "no profiler trace"
    again = subprocess.run(cmd, env=_env(8), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} step {step}" in again.stdout
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # nothing lost or twice
    for key in ("loss", "grad_norm", "lr/all", "tokens_per_s", "mfu", "step_time_s",
                "data_wait_s", "data/samples_seen", "data/skipped_total"):
        assert key in records[-1], key
    assert 0 < records[-1]["mfu"] < 1 and records[-1]["tokens_per_s"] > 0
    assert records[0]["lr/all"] < records[1]["lr/all"]  # warm-up
    tags = _tensorboard_scalars(workdir / "tensorboard")
    assert [s for s, _ in tags["loss"]] == list(range(1, steps + 1))
    np.testing.assert_allclose([v for _, v in tags["loss"]], [r["loss"] for r in records],
                               rtol=1e-6)
    assert "mfu" in tags and "lr/all" in tags


def _step_flops(cfg, rt, trained, real_tokens, images, row_length):
    return flops.FlopModel.of(cfg, rt, trained, row_length).step(real_tokens, images)


def test_mfu_formula_reproduces_the_pytorch_anchor():
    # DESIGN.md section 6: HF LLaVA (CLIP-L/336 + TinyLlama shapes) on one H100, seq 2048,
    # one image per row: 41.9k tokens/s = 29.5% MFU, 53.0k = 37.3% (of 989 TFLOP/s).
    cfg = presets.get("llava_1b")
    stage2 = flops.Trained(vision=False, projector=True, llm=True)
    for tokens_per_s, anchor in ((41.9e3, 0.295), (53.0e3, 0.373)):
        f = _step_flops(cfg, RuntimeConfig(), stage2, int(tokens_per_s),
                             tokens_per_s / 2048, 2048)
        assert abs(flops.mfu(f, 1.0, 1, flops.peak_flops("NVIDIA H100 80GB HBM3")) - anchor) \
            < 0.005
    # LLM matmul parameters of LLaVA-1.5-7B (Vicuna, vocabulary 32064): layers + lm_head
    assert flops.llm_matmul_params(presets.get("llava15_7b")) == \
        32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 4096 * 32064
    # stage 1 (LLM frozen, gradients through it) counts 4N, LoRA adds its adapters at 6x
    s1 = flops.Trained(vision=False, projector=True, llm=False, llm_gets_gradients=True)
    f2 = _step_flops(cfg, RuntimeConfig(), stage2, 1000, 0, 2048)
    f1 = _step_flops(cfg, RuntimeConfig(), s1, 1000, 0, 2048)
    n = flops.llm_matmul_params(cfg)
    assert abs((f2 - f1) - 2 * n * 1000) < 1e-6 * f2
    rt = RuntimeConfig(lora_rank=128, lora_alpha=256.0)
    assert _step_flops(cfg, rt, stage2, 1000, 0, 2048) == \
        f1 + 6 * flops.lora_params(cfg, rt) * 1000
    assert flops.peak_flops("cpu") is None and flops.peak_flops("TPU v5 lite") == 197e12


def test_k_skipped_steps_in_a_row_stop_naming_the_step():
    import types

    from mmjax.training.loop import NonFiniteStop, _stop_if_skipping

    ckpt = types.SimpleNamespace(intact=6)  # the newest checkpoint known good
    ok = [{"skipped_in_a_row": 0}] * 3
    _stop_if_skipping(ok, 3, 2, ckpt)
    steps = [{"skipped_in_a_row": n} for n in (0, 1, 2, 3)]  # steps 7..10
    import pytest

    with pytest.raises(NonFiniteStop, match=r"step 9: 2 steps in a row had a non-finite.*"
                                            r"newest intact checkpoint, step 6,"):
        _stop_if_skipping(steps, 10, 2, ckpt)


def test_distributed_settings_are_checked_and_detected():
    import pytest

    from mmjax.distributed import DistributedConfig, detect_cluster, initialize

    assert initialize(DistributedConfig(mode="none")) == "single"
    with pytest.raises(ValueError, match="num_processes, process_id"):
        initialize(DistributedConfig(mode="explicit", coordinator_address="127.0.0.1:1"))
    with pytest.raises(ValueError, match=r"process_id 2 is not in \[0, 2\)"):
        initialize(DistributedConfig(coordinator_address="127.0.0.1:1", num_processes=2,
                                     process_id=2))
    assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
    assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert detect_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert detect_cluster({}) is None  # no libtpu here: a single process
