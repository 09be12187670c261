#!/usr/bin/env bash
# llama.cpp's converter sources (pure Python: convert_hf_to_gguf.py, conversion/, gguf-py/) from the pinned
# llama-cpp-python sdist, which `mvquant export --format gguf` reuses for GGUF metadata and the tokenizer.
# No build: scripts/setup-llamacpp.sh builds llama.cpp itself (to run the files) and keeps its own copy.
# Usage: bash scripts/fetch-llamacpp-converter.sh [DEST]  (default $MVQUANT_CACHE or ~/.cache/mvquant, /llama.cpp-0.3.36)
set -euo pipefail
VERSION=0.3.36
CACHE="${MVQUANT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mvquant}"
DEST="${1:-$CACHE/llama.cpp-$VERSION}"
[ -f "$DEST/convert_hf_to_gguf.py" ] && [ -d "$DEST/gguf-py" ] && exit 0
PYTHON="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TMP"
SRC="llama_cpp_python-$VERSION/vendor/llama.cpp"
tar xzf "$TMP/llama_cpp_python-$VERSION.tar.gz" -C "$TMP" "$SRC/convert_hf_to_gguf.py" "$SRC/conversion" "$SRC/gguf-py" "$SRC/LICENSE"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.tmp" && mv "$TMP/$SRC" "$DEST.tmp" && mv "$DEST.tmp" "$DEST"
echo "llama.cpp $VERSION converter sources: $DEST"
