#!/usr/bin/env bash
# The Python packages bench/gpu.sh needs that a bare GPU machine of this workplace lacks (its image
# has torch, huggingface_hub, safetensors, transformers, einops, pluggy, pillow; not diffusers, not
# omegaconf/hydra), downloaded here as wheels for its Python 3.12 into .whl/ (ignored by git), to
# travel with the working tree. On the GPU machine, before bench/gpu.sh:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#       && export PYTHONPATH=/tmp/site
# (docs/performance.md, "On a GPU", has the whole command.)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
for package in diffusers==0.42.1 importlib_metadata==10.2.0 omegaconf==2.3.1 hydra-core==1.3.2; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "$package"
done
# omegaconf's parser runtime is published as a source archive only: built here into a pure-Python wheel.
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
