#!/usr/bin/env bash
# What bench/gpu_check.sh needs on a GPU machine that has no internet: wheels for Python 3.12 on
# manylinux x86-64 in .whl/, and tiny-random (whose tokenizer every model there uses) in .cache/.
# Both are git-ignored: carry them (the device tool's carry: [".whl", ".cache"]). The lent machines'
# image has torch, numpy, tokenizers, safetensors, peft, accelerate and the rest of the scientific
# stack (see the device's KINDS.md), with an older transformers; so this fetches transformers at the
# version this machine runs, with the new dependencies it brings, crafter and its own, and
# bitsandbytes for --qlora, and checks that they fit beside the working tree in 64 MiB.
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LIMIT=$((64 * 1024 * 1024))
TRANSFORMERS=$("$PYTHON" -c 'import transformers; print(transformers.__version__)')
PEFT=$("$PYTHON" -c 'import peft; print(peft.__version__)')
rm -rf .whl && mkdir .whl
download() {  # pip download for the lent machines' Python and platform, without dependencies
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$@"
}
# transformers and what it needs that the image's older stack lacks (huggingface_hub 2 with httpx2,
# kernels with tomlkit; hub's hf-xet only downloads, and the image has one); peft at the version
# this machine runs beside that transformers (the image's is not known); crafter's own needs
# (ruamel.yaml runs without its C extension); bitsandbytes for --qlora.
download "transformers==$TRANSFORMERS" "peft==$PEFT" "huggingface_hub>=2.4,<3" "httpx2>=2,<3" "httpcore2>=2,<3" \
  truststore "click>=8.4.2,<9" "kernels>=0.19.1,<0.20" tomlkit opensimplex ruamel.yaml bitsandbytes
"$PYTHON" -m pip wheel -q --no-deps crafter==1.8.3 -w .whl   # an sdist only: built here (pure Python)
AUTOMEM_CACHE=.cache "$PYTHON" -c 'import agent; print("tiny-random ->", agent.tiny_random_path())'
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb | tail -1 | cut -f1)  # what travels
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
cache=$(du -sb .cache | cut -f1)
total=$((tree + wheels + cache))
echo "working tree $((tree / 1024)) KiB + wheels $((wheels / 1024)) KiB + .cache $((cache / 1024)) KiB" \
     "= $((total / 1024 / 1024)) MiB of the 64 MiB a device call may carry"
if [ "$total" -gt "$LIMIT" ]; then
  echo "gpu_wheels.sh: over 64 MiB: leave out bitsandbytes (the --qlora step then fails alone)" >&2
  exit 1
fi
