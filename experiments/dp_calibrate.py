"""The noise for a target epsilon: python -m experiments.dp_calibrate --target_epsilon=4 \\
    --rounds=20 --num_clients=10 --clients_per_round=10 [--dp_delta=1e-5] [--mask_entries=N]

Prints the DP-FedAvg ``--dp_noise_multiplier`` whose epsilon after ``--rounds`` rounds (every
round a uniform sample of K of the N clients) is the target, and, with ``--mask_entries``,
the per-entry ``--mask_rr_epsilon`` of a mask method whose whole-mask epsilon is the target
(see fedmask_jax/privacy.py for how each is accounted).
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import exit_codes
from fedmask_jax import privacy

flags.DEFINE_float("target_epsilon", None, "Epsilon after --rounds rounds.")
flags.DEFINE_integer("rounds", None, "Rounds of the run.")
flags.DEFINE_integer("num_clients", 10, "Population N.")
flags.DEFINE_integer("clients_per_round", 10, "Cohort K.")
flags.DEFINE_float("dp_delta", 1e-5, "delta.")
flags.DEFINE_integer("mask_entries", 0, "Mask entries of a mask method's model (0: DP-FedAvg only).")
F = flags.FLAGS


def main(argv):
    del argv
    problems = []
    if F.target_epsilon is None or not F.target_epsilon > 0:
        problems.append("--target_epsilon must be > 0")
    if F.rounds is None or F.rounds < 1:
        problems.append("--rounds must be >= 1")
    if not 1 <= F.clients_per_round <= F.num_clients:
        problems.append("--clients_per_round must be between 1 and --num_clients")
    if not 0 < F.dp_delta < 1.0 / max(F.num_clients, 1):
        problems.append(f"--dp_delta must be in (0, 1/--num_clients = {1 / max(F.num_clients, 1):g})")
    if problems:
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        sys.exit(exit_codes.BAD_INPUT)
    z = privacy.noise_for_epsilon(F.target_epsilon, F.dp_delta, F.rounds, F.num_clients, F.clients_per_round)
    print(f"--dp_noise_multiplier={z:.6g}")
    if F.mask_entries:
        e = privacy.entry_epsilon_for(F.target_epsilon, F.dp_delta, F.rounds, F.mask_entries)
        print(f"--mask_rr_epsilon={e:.6g}")


if __name__ == "__main__":
    app.run(main)
