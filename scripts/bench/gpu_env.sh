#!/usr/bin/env bash
# Source on the GPU benchmark machine (no network): installs the carried wheels of nerfstudio and the dependencies
# its image lacks into /tmp/site, and points PYTHONPATH at them, this repository and the fpsample stand-in.
# Wheels are fetched on a networked machine with scripts/bench/fetch_gpu_wheels.sh into .whl/.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD:$PWD/scripts/bench/gpu_shims${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# gsplat's JIT build is cached here between calls when the caller carries it back in.
export TORCH_EXTENSIONS_DIR="$PWD/.gsplat_cache"
# A build saved by an earlier call (tar czf $OUT/gsplat_cache.tgz .gsplat_cache) can be carried in .gsplat_carry/.
if [ -f .gsplat_carry/gsplat_cache.tgz ] && [ ! -d .gsplat_cache ]; then tar xzf .gsplat_carry/gsplat_cache.tgz; fi
