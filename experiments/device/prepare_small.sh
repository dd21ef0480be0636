#!/usr/bin/env bash
# Prepare what the GPU device lacks for the `small` ablation (run here, in the repository root):
#   .carry/clic  the CLiC novels (34 MB of .txt.gz) from ../shared/corpora/clic
#   .whl/        wheels the device image does not have: rouge-score and its nltk dependency
# Both folders are git-excluded; name them in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p "$(git rev-parse --git-dir)/info"
exclude="$(git rev-parse --git-dir)/info/exclude"
grep -qx "/.carry/" "$exclude" 2>/dev/null || echo "/.carry/" >> "$exclude"
grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
mkdir -p .carry .whl
rm -rf .carry/clic && cp -r ../shared/corpora/clic .carry/clic
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl nltk==3.9.1 || true
python3 -m pip wheel -q --no-deps -w .whl rouge-score==0.1.2  # pure Python: a py3 wheel built here
du -sh .carry .whl
