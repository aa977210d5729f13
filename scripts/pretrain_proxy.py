"""Command line of `trpr.experiments.proxy_pretrain` (the same as `python -m trpr.experiments.proxy_pretrain`)."""
import sys

from trpr.experiments.proxy_pretrain import main

if __name__ == "__main__":
    sys.exit(main())
