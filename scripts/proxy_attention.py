"""Command line of `trpr.experiments.proxy_attention` (the same as `python -m trpr.experiments.proxy_attention`)."""
import sys

from trpr.experiments.proxy_attention import main

if __name__ == "__main__":
    sys.exit(main())
