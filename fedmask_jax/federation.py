"""Who takes part in a round, how much local work each client gets done, and how long the
round lasts on the simulated clock.

A run's federation has these settings (``RunConfig``):

* ``--availability``: each round, client c is available with probability p_c(r); the cohort
  is sampled uniformly without replacement among the available clients, keyed by
  (seed, round) as always (all of them when fewer than ``--clients_per_round`` are).
* ``--local_work``: each client's speed v_c, the share of its full local work
  (``--local_epochs`` over its data) it gets done in one second of the simulated clock; a
  property of its device, drawn once per client from the run's seed.
* ``--round_deadline`` D, in seconds: a client finishes its full work when v_c * D >= 1.
  The others are stragglers; ``--straggler_policy=drop`` leaves them out of the round,
  ``partial`` takes the floor(v_c * D * full steps) local steps they finished (a straggler
  that finished no step is dropped).
* ``--uplink_mbps``, ``--downlink_mbps``, ``--latency_s``: each client's link (``Network``),
  drawn once per client. A client's round is its latency, the download of the broadcast, its
  local work and the upload of its message, one after another; a synchronous round lasts until
  the slowest reporting client's message is in (``Federation.round_seconds``). The defaults
  (no bandwidth limit, no latency) leave only the local work.

The engine applies this through its cohort (``engine.make_cohort`` lays out the clients this
module chooses; this module imports nothing of the engine): a straggler's step budget masks
the steps past it inside the compiled round (no recompilation), and a dropped client has
weight 0. With every client available, at full speed and within the deadline (the defaults),
the cohort is exactly the one sampled without these settings.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, NamedTuple

import numpy as np

STRAGGLER_POLICIES = ("drop", "partial")
ALL_STEPS = 2**30  # a step budget no client reaches: its full local work
# Stream ids of the federation's random draws (beside the cohort's [seed, round]).
_SPEEDS, _AVAILABLE, _PHASES = 0x5EED, 2, 0xD1A
# The network's draws are keyed by (seed, 0, which, _NETWORK) and buffered aggregation's extra
# refills by (seed, round, index, _REFILL): four numbers, so that they cannot meet the
# (seed, round) and (seed, round, k) streams of the cohorts.
_UPLINK, _DOWNLINK, _LATENCY, _NETWORK, _REFILL = 1, 2, 3, 0x4E7, 0x8EF


def sample_cohort(seed: int, round_index: int, num_clients: int, k: int) -> np.ndarray:
    """Uniform sampling without replacement, keyed by (seed, round) only."""
    rng = np.random.default_rng([seed, round_index])
    return np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int32)


def _numbers(text: str, what: str, count: int) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} needs {count} comma-separated numbers, got {text!r}")
    return values


def read_client_values(path: str, num_clients: int, flag: str) -> np.ndarray:
    """A per-client CSV trace: one value per line (client 0 first), or ``client,value`` lines;
    a first line that is not numeric is a header."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file {path!r}")
    with open(path) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if lines and not _is_number(lines[0].split(",")[-1]):
        lines = lines[1:]
    values = np.full(num_clients, np.nan)
    try:
        for i, line in enumerate(lines):
            cells = line.split(",")
            client, value = (i, cells[0]) if len(cells) == 1 else (int(cells[0]), cells[-1])
            if not 0 <= client < num_clients:
                raise ValueError(f"{flag}: {path} names client {client}, but --num_clients={num_clients}")
            values[client] = float(value)
    except (IndexError, TypeError) as e:
        raise ValueError(f"{flag}: cannot read {path}: {e}") from None
    except ValueError as e:
        if str(e).startswith(flag):
            raise
        raise ValueError(f"{flag}: {path} has a value that is not a number ({e})") from None
    if np.isnan(values).any():
        raise ValueError(f"{flag}: {path} gives no value for {int(np.isnan(values).sum())} of the "
                         f"{num_clients} clients (first: client {int(np.flatnonzero(np.isnan(values))[0])})")
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def client_values(spec: str, num_clients: int, rng: np.random.Generator, flag: str,
                  words: dict[str, float], zero: bool = False) -> np.ndarray:
    """One positive value per client (``zero``: or zero) from a setting: a word of ``words``
    or a number (every client the same), ``uniform:LOW,HIGH``, ``lognormal:MU,SIGMA`` (of the
    value's log) or ``csv:PATH`` (one value per client)."""
    kind, _, args = spec.partition(":")
    if kind in words and not args:
        values = np.full(num_clients, words[kind])
    elif kind == "uniform":
        low, high = _numbers(args, f"{flag}=uniform:LOW,HIGH", 2)
        if not (0 <= low if zero else 0 < low) or not low <= high:
            raise ValueError(f"{flag}=uniform:LOW,HIGH needs 0 {'<=' if zero else '<'} LOW <= HIGH, got {args!r}")
        values = rng.uniform(low, high, num_clients)
    elif kind == "lognormal":
        mu, sigma = _numbers(args, f"{flag}=lognormal:MU,SIGMA", 2)
        if sigma < 0:
            raise ValueError(f"{flag}=lognormal:MU,SIGMA needs SIGMA >= 0, got {sigma}")
        values = rng.lognormal(mu, sigma, num_clients)
    elif kind == "csv" and args:
        values = read_client_values(args, num_clients, flag)
    elif not args and _is_number(kind) and not math.isnan(float(kind)):
        values = np.full(num_clients, float(kind))
        if zero and not np.isfinite(values).all():
            raise ValueError(f"{flag}={spec!r} must be finite")
    else:
        named = ", ".join(words)
        raise ValueError(f"{flag}={spec!r} is unknown; use {named + ', ' if named else ''}a number, "
                         "uniform:LOW,HIGH, lognormal:MU,SIGMA or csv:PATH")
    if not ((values >= 0) if zero else (values > 0)).all():
        raise ValueError(f"{flag}={spec!r} gives a client a value {'< 0' if zero else '<= 0'}; it must be "
                         f"{'zero or more' if zero else 'positive'}")
    return values


def client_speeds(spec: str, num_clients: int, seed: int) -> np.ndarray:
    """Each client's speed from ``--local_work``: ``full`` (1 for all), ``uniform:LOW,HIGH``,
    ``lognormal:MU,SIGMA`` (of the speed's log) or ``csv:PATH`` (one speed per client)."""
    return client_values(spec, num_clients, np.random.default_rng([seed, _SPEEDS]), "--local_work",
                         {"full": 1.0})


@dataclasses.dataclass(frozen=True)
class Network:
    """Each client's link: uplink and downlink in bits per second (inf: no limit) and a
    latency in seconds, paid once per round (the round trip)."""

    uplink_bps: np.ndarray  # [N]
    downlink_bps: np.ndarray  # [N]
    latency_s: np.ndarray  # [N]

    @property
    def limited(self) -> bool:
        """Whether message sizes take time (a finite bandwidth somewhere)."""
        return bool(np.isfinite(self.uplink_bps).any() or np.isfinite(self.downlink_bps).any())


def network(cfg, check_only: bool = False) -> Network:
    """``--uplink_mbps``, ``--downlink_mbps`` (inf, a number, a distribution or a trace, in
    Mbit/s) and ``--latency_s``, drawn once per client from the run's seed. ``check_only``:
    just say whether the settings are valid, drawing a distribution for a few clients only
    (a trace is still read for every client)."""
    n, seed = cfg.num_clients, cfg.seed
    specs = (cfg.uplink_mbps, cfg.downlink_mbps, cfg.latency_s)
    if check_only and not any(spec.startswith("csv:") for spec in specs):
        n = min(n, 1000)
    rng = lambda which: np.random.default_rng([seed, 0, which, _NETWORK])  # noqa: E731
    mbps = lambda spec, flag, which: 1e6 * client_values(spec, n, rng(which), flag, {"inf": math.inf})  # noqa: E731
    return Network(mbps(cfg.uplink_mbps, "--uplink_mbps", _UPLINK),
                   mbps(cfg.downlink_mbps, "--downlink_mbps", _DOWNLINK),
                   client_values(cfg.latency_s, n, rng(_LATENCY), "--latency_s", {}, zero=True))


def client_seconds(compute_s, downlink_bits, uplink_bits, downlink_bps, uplink_bps, latency_s):
    """A client's round on the simulated clock: latency, then the download, its local work and
    the upload, one after another."""
    return latency_s + downlink_bits / downlink_bps + compute_s + uplink_bits / uplink_bps


AvailabilityFn = Callable[[int], np.ndarray]  # round index -> each client's probability


def availability(spec: str, num_clients: int, seed: int) -> AvailabilityFn | None:
    """``--availability``: ``always`` (None), ``bernoulli:P`` (every client, every round),
    ``csv:PATH`` (one probability per client) or ``diurnal:PERIOD,LOW,HIGH`` (a client's
    probability follows a cosine between LOW and HIGH with a period of PERIOD rounds, at a
    phase drawn per client: clients in different time zones)."""
    kind, _, args = spec.partition(":")
    if kind == "always" and not args:
        return None
    if kind == "bernoulli":
        (p,) = _numbers(args, "--availability=bernoulli:P", 1)
        probs = np.full(num_clients, p)
        fn = _constant(probs)
    elif kind == "csv" and args:
        probs = read_client_values(args, num_clients, "--availability")
        fn = _constant(probs)
    elif kind == "diurnal":
        period, low, high = _numbers(args, "--availability=diurnal:PERIOD,LOW,HIGH", 3)
        if not (period > 0 and 0 <= low <= high <= 1):
            raise ValueError(f"--availability=diurnal:PERIOD,LOW,HIGH needs PERIOD > 0 and "
                             f"0 <= LOW <= HIGH <= 1, got {args!r}")
        phases = np.random.default_rng([seed, _PHASES]).random(num_clients)
        fn = lambda r: low + (high - low) * 0.5 * (1 + np.cos(2 * np.pi * (r / period - phases)))  # noqa: E731
        probs = fn(0)
    else:
        raise ValueError(f"--availability={spec!r} is unknown; use always, bernoulli:P, "
                         "diurnal:PERIOD,LOW,HIGH or csv:PATH")
    if not ((probs >= 0) & (probs <= 1)).all():
        raise ValueError(f"--availability={spec!r} gives a probability outside [0, 1]")
    return fn


def _constant(probs: np.ndarray) -> AvailabilityFn:
    def fn(r):
        return probs
    fn.constant = True
    return fn


class RoundPlan(NamedTuple):
    clients: np.ndarray  # the sampled cohort's ids
    steps: np.ndarray | None  # each one's step budget (None: all full work)
    valid: np.ndarray | None  # 1 for a client whose work counts, 0 for a dropped one
    fields: dict[str, int]  # record fields: how many were available, sampled, dropped, partial


@dataclasses.dataclass
class Federation:
    """One run's availability and clients' work (see the module docstring)."""

    seed: int
    num_clients: int
    clients_per_round: int
    full_steps: np.ndarray  # [N] each client's full local work, in steps
    budget: np.ndarray  # [N] steps each client gets done by the deadline (= full_steps: finishes)
    policy: str
    available: AvailabilityFn | None
    speeds: np.ndarray  # [N] each client's share of its full local work per second
    deadline: float  # seconds of local work a client has before it straggles
    network: Network

    @property
    def finishes(self) -> np.ndarray:
        return self.budget >= self.full_steps

    @property
    def heterogeneous(self) -> bool:
        return not self.finishes.all()

    def plan(self, round_index: int) -> RoundPlan:
        n, k = self.num_clients, self.clients_per_round
        fields: dict[str, int] = {}
        if self.available is None:
            clients = sample_cohort(self.seed, round_index, n, k)
        else:
            draw = np.random.default_rng([self.seed, round_index, _AVAILABLE]).random(n)
            pool = np.flatnonzero(draw < self.available(round_index)).astype(np.int32)
            rng = np.random.default_rng([self.seed, round_index])
            clients = np.sort(rng.choice(pool, size=min(k, len(pool)), replace=False)).astype(np.int32)
            fields.update(clients_available=len(pool), clients_sampled=len(clients))
        if not self.heterogeneous:
            return RoundPlan(clients, None, None, fields)
        finishes = self.finishes[clients]
        steps = np.where(finishes, ALL_STEPS, self.budget[clients]).astype(np.int32)
        keep = finishes if self.policy == "drop" else (steps > 0)
        fields.update(clients_dropped=int((~keep).sum()),
                      clients_partial=int((keep & ~finishes).sum()))
        return RoundPlan(clients, np.where(keep, steps, 0).astype(np.int32), keep.astype(np.float32), fields)

    def round_seconds(self, plan: RoundPlan, uplink_bits: np.ndarray, downlink_bits: float) -> float:
        """How long a synchronous round lasts on the simulated clock: until its slowest
        reporting client's upload is in. A client's local work takes 1 / speed seconds, or the
        deadline for a partial straggler; ``uplink_bits``: each reporting client's message, in
        cohort order. A dropped straggler makes the server wait out its deadline; a round with
        no client at all lasts the deadline."""
        clients = plan.clients
        if not len(clients):
            return self.deadline
        reports = np.ones(len(clients), bool) if plan.valid is None else plan.valid > 0
        finishes = self.finishes[clients]
        compute = np.where(finishes, 1.0 / self.speeds[clients], self.deadline)
        net = self.network
        up = np.where(reports, np.asarray(uplink_bits, np.float64)[:len(clients)], 0.0)
        times = client_seconds(np.where(reports, compute, self.deadline), downlink_bits, up,
                               net.downlink_bps[clients], net.uplink_bps[clients], net.latency_s[clients])
        return float(times.max())

    def refill(self, round_index: int, count: int, busy: np.ndarray, extra: int | None = None) -> np.ndarray:
        """``count`` clients (fewer if fewer are free) sampled uniformly without replacement
        among those available in round ``round_index`` and not ``busy``, keyed by
        (seed, round) as a synchronous cohort is (``extra``: a round's extra refill, keyed by
        (seed, round, extra, _REFILL)); sorted. With none busy and every client available,
        it is that cohort."""
        n = self.num_clients
        free = np.ones(n, bool)
        if self.available is not None:
            draw = np.random.default_rng([self.seed, round_index, _AVAILABLE]).random(n)
            free = draw < self.available(round_index)
        free[np.asarray(busy, np.int64)] = False
        pool = np.flatnonzero(free).astype(np.int32)
        rng = np.random.default_rng([self.seed, round_index] if extra is None
                                    else [self.seed, round_index, extra, _REFILL])
        return np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False)).astype(np.int32)

    def seconds(self, clients: np.ndarray, uplink_bits: np.ndarray, downlink_bits: float) -> np.ndarray:
        """Each client's time for its full local work and its messages (buffered aggregation)."""
        net = self.network
        return client_seconds(1.0 / self.speeds[clients], downlink_bits, np.asarray(uplink_bits, np.float64),
                              net.downlink_bps[clients], net.uplink_bps[clients], net.latency_s[clients])

    @property
    def uniform_sampling(self) -> bool:
        """Every round's reporting clients are a uniform sample of K of the N (what a privacy
        accountant's sampling amplification assumes)."""
        return self.available is None and not self.heterogeneous


def build(cfg, client_sizes: np.ndarray) -> Federation:
    """The federation ``cfg`` (a ``RunConfig``) describes for clients of these sizes; a
    setting that leaves no client able to take part fails here, before any compute."""
    n, k = cfg.num_clients, cfg.clients_per_round
    full = cfg.local_epochs * -(-np.asarray(client_sizes, np.int64) // cfg.batch_size)
    speeds = client_speeds(cfg.local_work, n, cfg.seed)
    capacity = speeds * cfg.round_deadline
    budget = np.where(capacity >= 1.0, full, np.floor(capacity * full + 1e-9)).astype(np.int64)
    if cfg.aggregation == "buffered":  # every client works until it is done; C are in flight
        budget, capacity, k = full, np.ones(n), cfg.slots
    if cfg.straggler_policy == "drop" and not (capacity >= 1.0).any():
        raise ValueError(f"--round_deadline={cfg.round_deadline:g}: no client can finish its local work in "
                         f"time under --local_work={cfg.local_work} (fastest speed "
                         f"{capacity.max() / cfg.round_deadline:.3g}), so --straggler_policy=drop would "
                         f"drop everyone; raise --round_deadline to at least "
                         f"{cfg.round_deadline / capacity.max():.3g} or use --straggler_policy=partial")
    if not (budget > 0).any():
        raise ValueError(f"--round_deadline={cfg.round_deadline:g}: no client finishes even one local step "
                         f"in time under --local_work={cfg.local_work}; raise --round_deadline")
    avail = availability(cfg.availability, n, cfg.seed)
    if avail is not None:
        horizon = range(1 if getattr(avail, "constant", False) else min(cfg.rounds, 1000))
        expected = min(float(np.sum(avail(r))) for r in horizon)
        if expected < k:
            what = "--concurrency" if cfg.aggregation == "buffered" else "--clients_per_round"
            raise ValueError(f"--availability={cfg.availability} leaves on average {expected:.1f} of the "
                             f"{n} clients available in some round, fewer than {what}={k}; "
                             f"lower {what} or raise the availability")
    return Federation(cfg.seed, n, k, full, budget, cfg.straggler_policy, avail, speeds, cfg.round_deadline,
                      network(cfg))
