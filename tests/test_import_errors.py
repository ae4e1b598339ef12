"""Bad inputs to the importer: each gives a clear error naming the file or tensor."""
import json
import shutil

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file, save_file

from hf_fixtures import llm_config, make_model, save
from mmjax.errors import ConfigError
from mmjax.hf import CheckpointError, load


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save(make_model(tf.LlamaForCausalLM, llm_config("llama")),
                tmp_path_factory.mktemp("llama"))


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(directory, fn):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")


def test_missing_config(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load(d)


def test_no_weight_files(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load(d)


def test_index_names_missing_shard(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    keys = load_file(str(d / "model.safetensors"))
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors.*missing"):
        load(d)


def test_sharded_checkpoint_with_index_loads(tmp_path):
    model = make_model(tf.LlamaForCausalLM, llm_config("llama"))
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    imported = load(tmp_path)
    np.testing.assert_array_equal(
        np.asarray(imported.params["norm"]["scale"]), model.model.norm.weight.detach().numpy())


def test_unknown_architecture(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown architecture.*GPT2LMHeadModel"):
        load(d)


def test_missing_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor.*model.layers.1.mlp.up_proj.weight"):
        load(d)


def test_unexpected_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    _edit_tensors(d, lambda t: t.update({"model.layers.0.extra_gate.weight":
                                         np.zeros((4, 4), np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensor.*model.layers.0.extra_gate"):
        load(d)


def test_shape_mismatch(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                         np.zeros((64, 64), np.float32)}))
    expected = r"shape mismatch.*k_proj.weight: checkpoint has \(64, 64\).*\(32, 64\)"
    with pytest.raises(CheckpointError, match=expected):
        load(d)


def test_truncated_file(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load(d)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "not a multiple of num_kv_heads 3"),
])
def test_config_the_model_cannot_represent(llama_dir, tmp_path, change, message):
    d = _copy(llama_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        load(d)


def test_pickle_checkpoint_refused_unless_opted_in(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, d / "pytorch_model.bin")
    expected = "(?s)pytorch_model.bin.*refused.*LlamaForCausalLM.*save_pretrained.*--allow-pickle"
    with pytest.raises(CheckpointError, match=expected):
        load(d)
    imported = load(d, allow_pickle=True)
    np.testing.assert_array_equal(np.asarray(imported.params["embed_tokens"]),
                                  tensors["model.embed_tokens.weight"])
