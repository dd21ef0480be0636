#!/usr/bin/env bash
# On the GPU device (repository root, with .carry and .whl carried): run the `small` ablation in the
# background under setsid, logging to $OUT; poll with `tail $OUT/small.log` in later calls.
#   device run:  bash experiments/device/run_small.sh        (carry: [".carry", ".whl"])
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ROPEKIT_CACHE=/tmp/ropekit-cache
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
# 1) the kernel's GPU tests first (minutes), 2) the ablation in the background
python3 -m pytest -q -m gpu tests/test_kernel.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.log"
setsid nohup python3 -m ropekit.cli demo --preset small --data .carry/clic --out /tmp/small > /tmp/small.log 2>&1 &
sleep 420
cp /tmp/small.log "$OUT/small.log"
ls /tmp/small
