#!/usr/bin/env python
"""Drop-in for TensorRT-LLM's generate_eplb_config.py (same flags); see `jax-eplb generate -h`."""
import sys

from jax_eplb.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
