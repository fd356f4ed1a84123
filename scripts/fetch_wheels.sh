#!/usr/bin/env bash
# Downloads into .whl/ the wheels an evidence run needs on a GPU machine without network
# (scripts/gpu_check.sh installs them there): the Hub loader, the FlashInfer dense peer,
# and the transformers version the Hub-form test and the generate benchmark need (the
# lent machines' own transformers 5.17 predates kernels 0.17 support: NOTES.md v30).
#   bash scripts/fetch_wheels.sh     # then carry .whl with the device call
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in kernels==0.17.2 transformers==5.20.0 flashinfer-python==0.5.3 apache-tvm-ffi==0.1.4 \
           nvidia-cudnn-frontend==1.32.0; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg"
done
ls -1 .whl
