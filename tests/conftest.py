"""Test set-up: 8 fake CPU devices so sharded code runs sharded; tiny HF model fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache under the checkout (.cache/, ignored by git), shared by
# the test processes and the training runs the tests start as subprocesses: a program is
# compiled once per checkout, not once per run (a fresh clone compiles everything once).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # LRU beyond 4 GiB


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo's generated shapes (96 training images at the demo tower's 56 pixels) and
    its BPE tokenizer: built once per test process."""
    from mmjax.data.synthetic import vocabulary_text, write_split
    from mmjax.data.templates import VICUNA_SYSTEM
    from mmjax.data.tokenizer_training import train_bpe_tokenizer
    from mmjax.models import presets

    data = tmp_path_factory.mktemp("demo")
    write_split(data, "train", 96, 56, seed=1)
    train_bpe_tokenizer(vocabulary_text() + [VICUNA_SYSTEM] * 3,
                        presets.get("demo").llm.vocab_size, data / "tokenizer")
    return data
