#!/usr/bin/env bash
# The GPU-only checks of the foundation, for one NVIDIA GPU host (CI has no GPU):
# cuDNN flash attention against the reference (bf16, fp16; fp32 is refused with a clear
# error), and the transformers parity suite with full-precision float32 matmuls.
#   bash launch/gpu_checks.sh            # uses the current python environment
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_DEFAULT_MATMUL_PRECISION=highest  # fp32 parity: no TF32 on the GPU
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python - <<'PY'
import jax
print("devices:", jax.devices())
from mmjax.models.attention import available_implementations
print("attention implementations here:", available_implementations())
PY
python -m pytest -q -rs tests/test_attention.py tests/test_hf_parity.py "$@"
