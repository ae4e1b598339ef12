"""Tokenizers load from the checkpoint dir; `python -m mmjax.hf verify` end to end."""
import os
import subprocess
import sys

import pytest
import transformers as tf

from hf_fixtures import llava_config, make_model, save
from mmjax.data.tokenizer_training import train_bpe_tokenizer
from mmjax.hf import CheckpointError, load_tokenizer

TEXTS = ["A chat between a curious human and an artificial intelligence assistant.",
         "USER: <image>\nWhat is in the picture? ASSISTANT: A cat on a sofa.",
         "Answer the question using a single word or phrase."] * 20


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    save(make_model(tf.LlavaForConditionalGeneration, llava_config()), d)
    train_bpe_tokenizer(TEXTS, 120, d)
    return d


def test_tokenizer_loads_from_checkpoint_dir(llava_dir):
    tok = load_tokenizer(llava_dir)
    ids = tok("USER: <image>\nWhat is in the picture?")["input_ids"]
    assert tok.convert_tokens_to_ids("<image>") in ids
    assert tok.decode(ids) == "USER: <image>\nWhat is in the picture?"
    assert tok.eos_token == "</s>"


def test_tokenizer_missing_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "none")


def _verify(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mmjax.hf", "verify", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_verify_passes_and_fails_on_tolerance(llava_dir):
    ok = _verify(llava_dir)
    assert ok.returncode == 0, ok.stderr
    assert "max relative error" in ok.stdout and "PASS" in ok.stdout
    strict = _verify(llava_dir, "--tol", "1e-12")
    assert strict.returncode == 1 and "FAIL" in strict.stdout


def test_verify_without_torch_says_how_to_install(llava_dir, tmp_path):
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    path = f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = dict(os.environ, PYTHONPATH=path)
    res = _verify(llava_dir, env=env)
    assert res.returncode == 2 and "pip install torch" in res.stderr


def test_verify_reports_bad_checkpoint(tmp_path):
    res = _verify(tmp_path / "missing")
    assert res.returncode == 2 and "does not exist" in res.stderr
