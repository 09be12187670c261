#!/usr/bin/env bash
# A separate virtual environment with llm-compressor 0.14, the reference GPTQ/AWQ that
# benchmarks/bench_reference.py compares against. It pins transformers<=5.17 and
# compressed-tensors 0.19, which cannot share mvquant's environment (transformers 5.24).
# torch is pinned first: a bare `torch` requirement pulls a multi-GB CUDA build.
# Usage: bash scripts/setup-llmcompressor.sh [VENV_DIR]   (default .venv-llmcompressor/)
set -euo pipefail
VENV="${1:-.venv-llmcompressor}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q torch==2.13.0
$PIP install -q "llmcompressor==0.14.0.1" "torch==2.13.0"
"$VENV/bin/python" -c "import llmcompressor, compressed_tensors, transformers, torch; print('llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
