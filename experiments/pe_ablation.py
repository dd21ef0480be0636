"""The paper's positional-encoding ablation (rope, pi, abf, xpos-abf), by preset.

    python experiments/pe_ablation.py --preset tiny            # = ropekit demo (2 CPU cores, ~10 min)
    python experiments/pe_ablation.py --preset cpu             # 3 seeds, budgets, xPos scale bases (2 CPU cores, ~1 h)
    python experiments/pe_ablation.py --preset small --data D  # one GPU, 2k -> 16k on a folder of long texts
    python experiments/pe_ablation.py --preset paper --dry-run # Llama 2 7B, 4k -> 32k: the plan

Presets and the pipeline live in ropekit/studies/ablation.py (``ropekit.studies.ablation.demo``); this script
calls them.
"""

import argparse

from ropekit.studies.ablation import PRESETS, demo

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--out", default=None, help="output folder (default runs/<preset>); run again to resume")
    p.add_argument("--data", default=None, help="text source for both stages (default: the preset's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--world-size", type=int, default=1, help="ranks, for the plan's accumulation")
    p.add_argument("--force", action="store_true", help="run a GPU preset without a GPU")
    a = p.parse_args()
    demo(a.preset, out=a.out, data=a.data, dry_run=a.dry_run, world_size=a.world_size, force=a.force)
