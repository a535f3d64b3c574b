"""The range coder's overhead over the ideal code length, per entry, on masks drawn from
known probabilities: the figures behind ``coding.max_bits``.

    python -m experiments.bench_coding [--out=PATH.json]
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

from fedmask_jax import coding

flags.DEFINE_string("out", None, "also write the table as JSON here")
FLAGS = flags.FLAGS

SIZES = (250_000, 1_000_000, 4_000_000)
MEANS = (1e-3, 3e-2, 0.1, 0.3)


def _theta(kind: str, mean: float, n: int, rng) -> np.ndarray:
    if kind == "uniform":  # probabilities spread around a mean
        return rng.uniform(0.5 * mean, 1.5 * mean, n)
    # a polarised model, as fedmask's theta_g: sure of almost every entry, unsure of `mean` of them
    theta = np.where(rng.uniform(size=n) < 0.5, coding.P_MIN, 1 - coding.P_MIN)
    unsure = rng.uniform(size=n) < mean
    theta[unsure] = rng.uniform(size=int(unsure.sum()))
    return theta


def measure(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for kind in ("uniform", "polarised"):
        for n in SIZES:
            for mean in MEANS:
                theta = _theta(kind, mean, n, rng)
                mask = (rng.uniform(size=n) < theta).astype(np.uint8)
                ideal = coding.ideal_bits(mask, theta)
                bits = coding.prior_bits(coding.encode(mask, theta))
                rows.append({"theta": kind, "n": n, "mean": mean, "ideal_bits": ideal, "bits": bits,
                             "over_bits": bits - ideal,
                             "over_per_entry": (bits - ideal - coding.FLUSH_BITS) / n,
                             "over_relative": (bits - ideal) / ideal,
                             "within_max_bits": bits <= coding.max_bits(ideal, n)})
    return rows


def main(argv):
    del argv
    rows = measure()
    print(f"{'theta':10s} {'n':>9s} {'mean':>6s} {'ideal':>11s} {'bits':>9s} {'over':>7s} "
          f"{'per entry':>10s} {'relative':>9s} within")
    for r in rows:
        print(f"{r['theta']:10s} {r['n']:9d} {r['mean']:6.3f} {r['ideal_bits']:11.1f} {r['bits']:9d} "
              f"{r['over_bits']:7.1f} {r['over_per_entry']:10.2e} {r['over_relative']:9.2e} "
              f"{r['within_max_bits']}")
    print(f"allowance: {coding.RELATIVE_SLACK:g} of the ideal + {coding.FLUSH_BITS} bits "
          f"+ {coding.PER_SYMBOL_BITS:.2e} bits per entry")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"rows": rows, "per_symbol_bits": coding.PER_SYMBOL_BITS,
                       "relative_slack": coding.RELATIVE_SLACK, "flush_bits": coding.FLUSH_BITS}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
