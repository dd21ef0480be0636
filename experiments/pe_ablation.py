"""The paper's positional-encoding ablation (rope, pi, abf, xpos-abf), by preset.

    python experiments/pe_ablation.py --preset tiny            # = ropekit demo (2 CPU cores, ~10 min)
    python experiments/pe_ablation.py --preset small           # one GPU, 2k -> 16k on a folder of novels
    python experiments/pe_ablation.py --preset paper --dry-run # Llama 2 7B, 4k -> 32k: the plan

Presets and the pipeline live in ropekit/ablation.py; this script is the command line over them.
"""

import sys

from ropekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
