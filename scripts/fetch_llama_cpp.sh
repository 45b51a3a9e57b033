#!/usr/bin/env bash
# What scripts/gpu_session.sh needs on a GPU machine and cannot fetch there (it has no network), fetched here, where
# PyPI is reachable: llama.cpp's source for the peer, and gguf-py's wheel (the GPU image lacks it; mtpx convert and
# GGUF loading need it). The llama-cpp-python sdist vendors the llama.cpp the CPU peers in BENCHMARKS.md were
# built from (llama-server with --spec-type draft-mtp and --spec-synth-rates). Writes
#   third_party/llama.cpp.tar.xz   that tree without what a CUDA build of llama-server does not need (models, docs,
#                                  tests, examples, the web UI's sources, the other GPU backends): a few MB, so that
#                                  it travels with the repo (64 MiB in all), compressed because the repo alone is
#                                  about half of that;
#   third_party/llama.cpp/         the same tree unpacked (not carried: for a build here, or a look);
#   third_party/wheels/            gguf's wheel, the version installed here (pure Python; its needs are in the image).
# third_party/ is ignored by git through .git/info/exclude, so these travel only when a call carries them:
#   run(command="bash scripts/gpu_session.sh", carry=["third_party/llama.cpp.tar.xz", "third_party/wheels"],
#       timeout_s=600)
# gpu_session.sh finds them there by default (LLAMA_CPP_SRC, a directory or such an archive; WHEELS).
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 DEST=third_party PY=python bash scripts/fetch_llama_cpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36} DEST=${DEST:-third_party} PY=${PY:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
tar -xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp"
src="$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$src/CMakeLists.txt" ]; then
  echo "fetch_llama_cpp: no vendored llama.cpp in llama-cpp-python $VERSION" >&2
  exit 1
fi
# left out: nothing the build reads with tests, examples and the UI's npm build off (gpu_session.sh's cmake flags);
# tools/ui keeps its CMake files, which then embed no UI
(cd "$src" && rm -rf models docs media benches tests examples pocs gguf-py conversion skills ci grammars requirements \
  licenses tools/ui/src tools/ui/tests tools/ui/static tools/ui/package-lock.json ./*.py \
  ggml/src/ggml-{cann,et,hexagon,metal,musa,opencl,openvino,sycl,virtgpu,vulkan,webgpu,zdnn,zendnn,hip,blas,rpc})
mkdir -p "$DEST"
rm -rf "$DEST/llama.cpp"
cp -a "$src" "$DEST/llama.cpp"
echo "llama-cpp-python $VERSION" > "$DEST/llama.cpp/MTPX_SOURCE"
tar -C "$DEST" -cJf "$DEST/llama.cpp.tar.xz" llama.cpp
GGUF_VERSION=$($PY -c "import importlib.metadata as m; print(m.version('gguf'))")
rm -rf "$DEST/wheels"
$PY -m pip download --quiet --no-deps --only-binary=:all: "gguf==$GGUF_VERSION" -d "$DEST/wheels"
if [ -d .git ] && ! grep -qx "/$DEST/" .git/info/exclude 2>/dev/null; then
  mkdir -p .git/info && echo "/$DEST/" >> .git/info/exclude
fi
echo "fetch_llama_cpp: $DEST/llama.cpp.tar.xz ($(du -h "$DEST/llama.cpp.tar.xz" | cut -f1)), $DEST/llama.cpp" \
  "($(du -sh "$DEST/llama.cpp" | cut -f1)), $DEST/wheels ($(ls "$DEST/wheels")): carry $DEST/llama.cpp.tar.xz and" \
  "$DEST/wheels" >&2
