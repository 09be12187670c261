#!/usr/bin/env bash
# llama.cpp for mvquant's GGUF export: llama-cpp-python 0.3.36 built from its sdist (libllama with
# cmake + gcc, native CPU flags, ~6 min on 2 cores) in its own virtual environment, plus llama.cpp's
# own tools from the same build tree (llama-quantize, llama-bench, llama-perplexity, llama-imatrix) and
# the sdist's vendored converter sources (convert_hf_to_gguf.py, conversion/, gguf-py), which
# `mvquant export --format gguf` reuses for GGUF metadata and the tokenizer.
# Why its own venv and a source build: the prebuilt llama-cpp-python wheels need a newer glibc /
# libstdc++ than this machine has, and llama.cpp is not packaged by Debian here.
# Usage: bash scripts/setup-llamacpp.sh [VENV_DIR]   (default .venv-llamacpp/)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv-llamacpp}"
VENV="$(mkdir -p "$VENV" && cd "$VENV" && pwd)"
PYTHON="${PYTHON:-python3}"
VERSION=0.3.36
JOBS="${JOBS:-$(nproc)}"

# Keep the venv (and the build tree inside it) out of git.
grep -qxF '/.venv-llamacpp/' "$ROOT/.gitignore" 2>/dev/null || echo '/.venv-llamacpp/' >> "$ROOT/.gitignore"

command -v cmake >/dev/null || { echo "cmake missing: apt-get install -y cmake" >&2; apt-get install -y cmake; }
command -v g++ >/dev/null || { echo "g++ missing: apt-get install -y g++" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
$PY -m pip install -q --upgrade pip

# The sdist, kept: its vendor/llama.cpp holds the converter mvquant reuses (see README, --format gguf).
SRC="$VENV/src"
if [ ! -f "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    mkdir -p "$SRC"
    $PY -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SRC"
    tar xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
fi
SDIST="$SRC/llama_cpp_python-$VERSION"

# Build from the extracted sdist with a kept build tree, so llama.cpp's tools can be built from it after.
BUILD="$VENV/build"
CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
    $PY -m pip install -q "$SDIST" --config-settings=build-dir="$BUILD"

# llama.cpp's own tools from the same configured tree (objects are shared; only the tools compile).
cmake "$BUILD" -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF >/dev/null
cmake --build "$BUILD" -j "$JOBS" --target llama-quantize llama-bench llama-perplexity llama-imatrix
mkdir -p "$VENV/bin"
for t in llama-quantize llama-bench llama-perplexity llama-imatrix; do
    ln -sf "$(find "$BUILD" -type f -name "$t" -perm -u+x | head -1)" "$VENV/bin/$t"
done
ln -sfn "$SDIST/vendor/llama.cpp" "$VENV/llama.cpp"

$PY -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'system_info', llama_cpp.llama_print_system_info().decode()[:200])"
"$VENV/bin/llama-quantize" --help 2>&1 | head -1 || true
