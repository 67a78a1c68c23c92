#!/usr/bin/env bash
# Download (on a networked machine) the cp312 manylinux wheels that the GPU image lacks, at the versions pinned in
# this machine's .venv, into .whl/ (git-ignored). fpsample has no cp312 wheel: gpu_shims/ stands in for it.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
version() { .venv/bin/pip show "$1" | awk '/^Version/{print $2}'; }
for pkg in nerfstudio gsplat tyro docstring-parser typeguard viser msgspec websockets nerfacc pytorch-msssim splines \
           pyquaternion rawpy dill multiprocess pathos ppft tensorly appdirs defusedxml plyfile trimesh yourdfpy \
           nodeenv pysocks timm diffusers importlib_metadata; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg==$(version "$pkg")"
done
