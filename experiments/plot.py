"""Overlays several runs: python -m experiments.plot RUN_DIR [RUN_DIR ...] [--out=DIR]."""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import exit_codes
from fedmask_jax.plots import plot_runs

flags.DEFINE_string("out", "plots", "Folder for the PNG files.")


def main(argv):
    if len(argv) < 2:
        print("usage: python -m experiments.plot RUN_DIR [RUN_DIR ...] [--out=DIR]", file=sys.stderr)
        sys.exit(exit_codes.BAD_INPUT)
    try:
        for path in plot_runs(argv[1:], flags.FLAGS.out):
            print(path)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(exit_codes.BAD_INPUT)


if __name__ == "__main__":
    app.run(main)
