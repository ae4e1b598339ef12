"""The launch scripts in dry-run mode, with a fake `gcloud` / `srun` on PATH that records any
call: every command they would run is printed (and nothing is run), the TPU setup installs
the project's `tpu` extra (not an unpinned jax[tpu]), and the train command they would start
parses as a valid stage config with no runtime overrides."""
import os
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from data_pipelines.beam_build import runner_args
from data_pipelines.convert import parser
from mmjax import configlib
from mmjax.training.config import from_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--config", "configs/stage2.py:llava15_7b", "--workdir", "/mnt/shared/runs/s2",
              "--config.init.hf_llava=/mnt/shared/hf/llava-1.5-7b-hf",
              "--config.data.sources=[{'kind': 'arrayrecord', 'path': '/mnt/shared/mix665k'}]"]


def _fake_bin(tmp_path: Path, *names: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/called.log"\n')
        tool.chmod(0o755)
    return bin_dir


def _run(script: str, args: list[str], tmp_path: Path, fakes: tuple, **env):
    bin_dir = _fake_bin(tmp_path, *fakes)
    full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", DRY_RUN="1", **env)
    r = subprocess.run(["bash", str(ROOT / "launch" / script), *args], env=full_env,
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "called.log").exists(), "dry run called a tool"
    return [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]


def _train_argv(command: str) -> list[str]:
    """The mmjax.train arguments inside a remote shell command line."""
    words = shlex.split(command)
    start = words.index("mmjax.train") + 1
    return words[start:words.index(">", start)] if ">" in words[start:] else words[start:]


def _check_train_args(argv: list[str]):
    assert not any(a.startswith("--config.runtime.") for a in argv), argv
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv if a.startswith("--config.")]
    tc = from_config(configlib.load(str(ROOT / config), overrides))
    assert tc.stage == 2 and tc.model == "llava15_7b"
    assert tc.runtime.attention_impl == "auto" and tc.runtime.scan_layers
    assert tc.data.packing == "best_fit" and tc.data.sources[0].kind == "arrayrecord"
    return tc


def test_tpu_pod_setup_installs_the_tpu_extra(tmp_path):
    cmds = _run("tpu_pod.sh", ["setup"], tmp_path, ("gcloud",), TPU_NAME="pod", ZONE="z1")
    assert [c[:4] for c in cmds[1:]] == [["gcloud", "compute", "tpus", "tpu-vm"]] * 2
    assert cmds[1][4] == "scp" and "--worker=all" in cmds[1]
    remote = cmds[2][cmds[2].index("--command") + 1]
    assert "pip install -q -e '.[tpu]'" in remote
    assert "'jax[tpu]'" not in remote and "jax[tpu]" not in remote.replace("[tpu]'", "")


def test_tpu_pod_train_runs_the_recipe_as_written(tmp_path):
    cmds = _run("tpu_pod.sh", ["train", *TRAIN_ARGS], tmp_path, ("gcloud",),
                TPU_NAME="pod", ZONE="z1", PROJECT="proj")
    (cmd,) = cmds
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert ["--zone", "z1"] == cmd[6:8] and ["--project", "proj"] == cmd[8:10]
    assert "--worker=all" in cmd
    _check_train_args(_train_argv(cmd[cmd.index("--command") + 1]))


def test_tpu_pod_stop_sends_sigterm_everywhere(tmp_path):
    (cmd,) = _run("tpu_pod.sh", ["stop"], tmp_path, ("gcloud",), TPU_NAME="p", ZONE="z")
    assert "--worker=all" in cmd and "pkill -TERM -f mmjax.train" in cmd[-1]


def test_slurm_script_runs_srun_with_the_recipe(tmp_path):
    (cmd,) = _run("slurm_gpu.sbatch", TRAIN_ARGS, tmp_path, ("srun", "scontrol"))
    assert cmd[:2] == ["srun", "--kill-on-bad-exit=1"] and "--config.mesh_granule=process" in cmd
    tc = _check_train_args(cmd[cmd.index("mmjax.train") + 1:])
    assert tc.mesh_granule == "process"


@pytest.mark.parametrize("script", ["tpu_pod.sh"])
def test_missing_settings_are_named(tmp_path, script):
    r = subprocess.run(["bash", str(ROOT / "launch" / script), "train"], capture_output=True,
                       text=True, env=dict(os.environ, DRY_RUN="1"), timeout=30)
    assert r.returncode != 0 and "TPU_NAME" in r.stderr


DATA_ARGS = ["webdataset", "gs://bkt/cc12m/00000.tar", "gs://bkt/cc12m/00001.tar",
             "--out", "gs://bkt/shards/cc12m", "--max-side", "336"]


def _convert_options(cmd: list[str]):
    """The printed `python -m data_pipelines.convert` argv: convert's arguments and Beam's
    pipeline options, each parsed by its own parser."""
    from apache_beam.options.pipeline_options import PipelineOptions  # the beam extra

    assert cmd[1:3] == ["-m", "data_pipelines.convert"], cmd
    args, rest = parser().parse_known_args(cmd[3:])
    return args, PipelineOptions(runner_args(args.runner, rest)).get_all_options()


def test_dataflow_data_builds_a_wheel_and_submits_the_conversion(tmp_path):
    pytest.importorskip("apache_beam")  # the beam extra
    wheel, convert = _run("dataflow_data.sh", DATA_ARGS, tmp_path, (), PROJECT="proj",
                          REGION="us-central1", BUCKET="gs://bkt", MAX_WORKERS="40")
    assert wheel[1:4] == ["-m", "pip", "wheel"] and "--no-deps" in wheel
    args, opts = _convert_options(convert)
    assert args.kind == "webdataset" and args.out == "gs://bkt/shards/cc12m"
    assert args.tars == DATA_ARGS[1:3] and args.max_side == 336
    assert opts["runner"] == "DataflowRunner" and opts["project"] == "proj"
    assert opts["region"] == "us-central1" and opts["temp_location"] == "gs://bkt/tmp"
    assert opts["max_num_workers"] == 40
    assert opts["extra_packages"] == [f"dist/mmjax-{_version()}-py3-none-any.whl"]
    assert wheel[wheel.index("--wheel-dir") + 1] == "dist"


def test_spark_data_runs_the_conversion_in_the_sdk_image(tmp_path):
    pytest.importorskip("apache_beam")  # the beam extra
    (convert,) = _run("spark_data.sh", DATA_ARGS, tmp_path, (),
                      SPARK_MASTER="spark://head:7077", SDK_IMAGE="reg/mmjax-beam:1")
    args, opts = _convert_options(convert)
    assert args.kind == "webdataset" and args.runner == "SparkRunner"
    assert opts["spark_master_url"] == "spark://head:7077"
    assert opts["environment_type"] == "DOCKER" and opts["environment_config"] == \
        "reg/mmjax-beam:1"


@pytest.mark.parametrize("script,needs", [("dataflow_data.sh", "PROJECT"),
                                          ("spark_data.sh", "SPARK_MASTER")])
def test_data_launchers_name_missing_settings(script, needs):
    r = subprocess.run(["bash", str(ROOT / "launch" / script), *DATA_ARGS],
                       capture_output=True, text=True, env=dict(os.environ, DRY_RUN="1"),
                       timeout=30)
    assert r.returncode != 0 and needs in r.stderr


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
