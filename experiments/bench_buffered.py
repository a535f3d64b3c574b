"""What a buffered round costs against a synchronous round of the same work: both train
``--buffer_size`` clients a round (the synchronous one as its cohort), the buffered one among
``--concurrency`` clients in flight. Both programs are built and compiled once, then their
rounds alternate in this process, after warm-up rounds (the buffered run's first round also
fills its other slots); the figure is the median of the per-pair ratios.

    python -m experiments.bench_buffered [--pairs=10] [--out=PATH.json]
"""

from __future__ import annotations

import json
import statistics
import time

import jax
from absl import app, flags

from fedmask_jax import experiment
from fedmask_jax.run_config import RunConfig

flags.DEFINE_string("algorithm", "fedpm", "Method of both runs.")
flags.DEFINE_string("dataset", "fashion_mnist", "Dataset of both runs.")
flags.DEFINE_integer("num_clients", 100, "Population; the buffered run has all of them in flight by default.")
flags.DEFINE_integer("concurrency", 100, "Buffered: clients in flight.")
flags.DEFINE_integer("buffer_size", 10, "Clients trained per round by both (the synchronous cohort).")
flags.DEFINE_integer("pairs", 10, "Timed pairs of rounds.")
flags.DEFINE_integer("warmup", 2, "Untimed rounds of each first.")
flags.DEFINE_string("out", None, "Also write the figures as JSON here.")
FLAGS = flags.FLAGS


def _setting(**kw) -> RunConfig:
    return RunConfig(dataset=FLAGS.dataset, model="mlp", mlp_hidden=(300, 100), num_clients=FLAGS.num_clients,
                     clients_per_round=FLAGS.buffer_size, local_epochs=3, batch_size=128, rounds=10**6,
                     algorithm=FLAGS.algorithm, verbose=False, tensorboard=False, workdir="/tmp/unused", **kw)


class Stepper:
    """One run's rounds, one at a time, as the loop runs them (its host work and all)."""

    def __init__(self, cfg: RunConfig):
        self.exp = experiment.build(cfg)
        self.server, self.store = self.exp.initial_state()
        self.buffer = self.exp.initial_buffer(self.server)
        self.exp.compile(self.server, self.store, self.buffer)
        self.r = 0

    def step(self) -> float:
        t0 = time.perf_counter()
        cohort, plans = self.exp.round_plan(self.r, self.buffer)
        out = self.exp.round(self.server, self.store, cohort, self.r, self.buffer, plans)
        self.exp.metrics(out)
        self.exp.round_seconds(plans, out, self.exp.metrics(out))
        jax.block_until_ready((out.server, out.store))
        self.server, self.store, self.buffer, self.r = out.server, out.store, out.contributions, self.r + 1
        return time.perf_counter() - t0


def main(argv):
    del argv
    sync = Stepper(_setting())
    buffered = Stepper(_setting(aggregation="buffered", concurrency=FLAGS.concurrency, buffer_size=FLAGS.buffer_size))
    for _ in range(FLAGS.warmup):
        sync.step(), buffered.step()
    pairs = []
    for i in range(FLAGS.pairs):  # alternate which goes first
        if i % 2:
            b, s = buffered.step(), sync.step()
        else:
            s, b = sync.step(), buffered.step()
        pairs.append((s, b))
    ratios = [b / s for s, b in pairs]
    out = {"algorithm": FLAGS.algorithm, "dataset": FLAGS.dataset, "num_clients": FLAGS.num_clients,
           "concurrency": FLAGS.concurrency, "buffer_size": FLAGS.buffer_size, "backend": jax.default_backend(),
           "sync_round_s": statistics.median(s for s, _ in pairs),
           "buffered_round_s": statistics.median(b for _, b in pairs),
           "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
           "pairs": pairs}
    print(f"{FLAGS.algorithm} on {FLAGS.dataset}, {FLAGS.buffer_size} clients trained a round; buffered with "
          f"{FLAGS.concurrency} of {FLAGS.num_clients} in flight ({jax.default_backend()}):")
    print(f"  synchronous round {out['sync_round_s']:.3f} s, buffered round {out['buffered_round_s']:.3f} s (medians)")
    print(f"  buffered / synchronous, pair by pair: median {out['ratio_median']:.3f} "
          f"(min {out['ratio_min']:.3f}, max {out['ratio_max']:.3f}, {len(pairs)} pairs)")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    app.run(main)
