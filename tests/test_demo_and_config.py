"""The embedded demo runs end to end; config files and overrides resolve to typed values."""
from pathlib import Path

import pytest

from mmjax import configlib, demo
from mmjax.models.config import RuntimeConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_demo_runs_sharded_and_matches_single_device():
    stats = demo.forward_demo(["--config.mesh.tensor=2"])
    assert stats["logits_shape"][0] == 4 and stats["logits_shape"][2] == 512
    assert stats["sharded_vs_unsharded_max_abs_diff"] < 1e-5


def test_config_variants_and_overrides():
    cfg = configlib.load(f"{CONFIGS / 'model.py'}:llava15_7b_gpu",
                         ["--config.mesh.fsdp=8", "--config.runtime.scan_layers=False"])
    assert configlib.runtime(cfg) == RuntimeConfig(
        dtype="bfloat16", attention_impl="cudnn", remat_policy="save_qkv_context",
        scan_layers=False)
    assert configlib.mesh_axes(cfg)["fsdp"] == 8
    assert configlib.model(cfg).image_tokens == 576
    assert ("embed", "fsdp") in configlib.rules(cfg)
    assert ("activation_batch", ("data", "fsdp")) in configlib.rules(cfg)


def test_config_errors_are_clear():
    with pytest.raises(KeyError, match="unknown config field 'runtime.nope'"):
        configlib.load(str(CONFIGS / "model.py"), ["--config.runtime.nope=1"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        configlib.load("configs/missing.py")
    with pytest.raises(KeyError, match="unknown model preset 'llava99'"):
        configlib.model(configlib.load(f"{CONFIGS / 'model.py'}:llava99"))
