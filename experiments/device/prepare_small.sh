#!/usr/bin/env bash
# Prepare what the GPU device lacks for the `small` ablation (run here, in the repository root):
#   .carry/clic  the CLiC novels (34 MB of .txt.gz) from ../shared/corpora/clic
#   .whl/        wheels the device image does not have: rouge-score and its nltk dependency
# Both folders are git-excluded; name them in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .carry .whl
rm -rf .carry/clic && cp -r ../shared/corpora/clic .carry/clic
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl nltk==3.9.1 || true
python3 -m pip download -q --no-deps --no-binary :all: -d .whl rouge-score==0.1.2
du -sh .carry .whl
