"""The commands keep compiled programs on disk (`mmjax.compile_cache`): where, how it is
turned off, and a second process reading what the first compiled."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mmjax import compile_cache


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("MMJAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.directory() == f"{tmp_path}/xdg/mmjax/jax"
    monkeypatch.setenv("MMJAX_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.directory() == f"{tmp_path}/mine/jax"
    assert compile_cache.directory("gs://bucket/cache/") == "gs://bucket/cache/jax"  # config
    monkeypatch.setenv("MMJAX_CACHE_DIR", "off")
    assert compile_cache.directory() is None
    assert compile_cache.directory("OFF") is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # JAX's own wins
    assert compile_cache.directory("off") == str(tmp_path / "jax")


@pytest.mark.e2e
def test_a_second_generate_process_reads_the_program_from_the_cache(tmp_path):
    """Two `python -m mmjax.generate` processes: the first writes its generation program to
    $MMJAX_CACHE_DIR, the second finds it there (no new entry) and answers the same."""
    import transformers as tf

    from data_fixtures import bpe_tokenizer, write_photos
    from hf_fixtures import llava_config, make_model, save

    model = tmp_path / "model"
    tok = bpe_tokenizer(model, ["What is it? A cat, a dog, a cup."] * 20, vocab_size=300)
    cfg = llava_config("clip", "llama", image_token_id=tok.convert_tokens_to_ids("<image>"))
    cfg.text_config.vocab_size = len(tok)
    save(make_model(tf.LlavaForConditionalGeneration, cfg), model)
    photo = tmp_path / write_photos(tmp_path)[0]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["MMJAX_CACHE_DIR"] = str(tmp_path / "cache")
    command = [sys.executable, "-m", "mmjax.generate", "--hf", str(tmp_path / "model"),
               "--image", str(photo), "--prompt", "What is it?", "--max-new-tokens", "8",
               "--output", "json"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    entries = {p.name for p in (tmp_path / "cache" / "jax").iterdir()}
    assert any(name.startswith("jit__run") for name in entries), entries
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert {p.name for p in (tmp_path / "cache" / "jax").iterdir()} == entries
    assert second.stdout == first.stdout
