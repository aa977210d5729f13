"""Command line of `trpr.experiments.ablation_sweep` (the same as `python -m trpr.experiments.ablation_sweep`)."""
import sys

from trpr.experiments.ablation_sweep import main

if __name__ == "__main__":
    sys.exit(main())
