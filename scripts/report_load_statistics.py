#!/usr/bin/env python
"""Drop-in for TensorRT-LLM's report_load_statistics.py (same flags); see `jax-eplb report -h`."""
import sys

from jax_eplb.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
