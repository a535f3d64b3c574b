"""Differential privacy accounting, with Google's ``dp-accounting`` library (RDP accountant).

Two mechanisms, each described as the ``DpEvent`` of one round:

* DP-FedAvg (``fedavg`` with ``--dp_noise_multiplier``): the sum of the clients' clipped
  updates plus Gaussian noise of std z * C. Neighbouring federations differ in one client's
  data (*replace one*), so one client moves the sum by at most 2C: the event is a Gaussian
  with noise multiplier z / 2. When each round's clients are a uniform sample of K of the N
  (no availability trace, no straggler drops), the round is that Gaussian on a sample drawn
  without replacement (Wang, Balle & Kasiviswanathan 2019); otherwise no amplification by
  sampling is claimed.
* Randomized response on each uplink mask entry (mask methods, ``--mask_rr_epsilon`` = e):
  every entry is flipped with probability 1 / (1 + e^e), so each entry is e-local-DP; a
  client's whole mask is the composition of its ``num_params`` entries, and its rounds the
  composition of the rounds it joins -- counted as every round (local DP gets nothing from
  the server's sampling).

The records carry ``epsilon``: the epsilon at ``--dp_delta`` of all the rounds so far. A run
with ``--target_epsilon`` stops after the last round whose epsilon stays within the target.
(``dp-accounting`` 0.6's PLD accountant ignores the count of a composed randomized-response
event, so everything here uses its RDP accountant.)
"""

from __future__ import annotations

import importlib
import math
from functools import lru_cache
from typing import TYPE_CHECKING

from fedmask_jax.algorithms.base import HostContext, HostHook
from fedmask_jax.config import setting

if TYPE_CHECKING:
    import dp_accounting


def _dp():
    """dp-accounting, imported when an accountant is first built: it brings scipy, about a
    second of every run's start (and of every subprocess the tests start), and most runs
    have no DP."""
    return importlib.import_module("dp_accounting")


# The accountant's two settings, a field of each method config it reads: one flag shared by
# those methods, so one declaration (a fresh field per class: dataclasses write into it).
def dp_delta_setting():
    return setting(1e-5, "The delta at which the accountant reports epsilon (must be below "
                   "1 / --num_clients).", min=0, max=1, min_open=True, max_open=True)


def target_epsilon_setting():
    return setting(0.0, "Stop the run at the last round whose epsilon stays within this "
                   "(0 = no target).", min=0)


def gaussian_round(noise_multiplier: float, num_clients: int, clients_per_round: int,
                   uniform_sampling: bool = True) -> dp_accounting.DpEvent:
    """One DP-FedAvg round (see the module docstring)."""
    dp = _dp()
    gaussian = dp.GaussianDpEvent(noise_multiplier / 2.0)
    if uniform_sampling and clients_per_round < num_clients:
        return dp.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, gaussian)
    return gaussian


def flip_probability(entry_epsilon: float) -> float:
    """Randomized response on one bit with epsilon ``entry_epsilon``: P(flip) = 1/(1+e^eps)."""
    return 1.0 / (1.0 + math.exp(entry_epsilon))


def randomized_response_round(entry_epsilon: float, entries: int) -> dp_accounting.DpEvent:
    """One round of a client's mask under per-entry randomized response. dp-accounting's
    randomized response over 2 buckets with noise parameter r outputs a uniform bucket with
    probability r, i.e. flips with probability r / 2."""
    dp = _dp()
    one = dp.RandomizedResponseDpEvent(2.0 * flip_probability(entry_epsilon), 2)
    return dp.SelfComposedDpEvent(one, entries)


class Accountant:
    """Epsilon after r rounds of the same per-round event."""

    def __init__(self, round_event: dp_accounting.DpEvent, delta: float):
        self.round_event, self.delta = round_event, delta
        self.epsilon = lru_cache(maxsize=None)(self._epsilon)

    def _epsilon(self, rounds: int) -> float:
        dp = _dp()
        accountant = dp.rdp.RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)
        accountant.compose(self.round_event, rounds)
        return float(accountant.get_epsilon(self.delta))

    def rounds_within(self, target: float, most: int) -> int:
        """The most rounds (<= ``most``) whose epsilon stays within ``target`` (epsilon grows
        with the rounds: a binary search)."""
        low, high = 0, most
        while low < high:
            mid = (low + high + 1) // 2
            if self.epsilon(mid) <= target:
                low = mid
            else:
                high = mid - 1
        return low


def noise_for_epsilon(target: float, delta: float, rounds: int, num_clients: int,
                      clients_per_round: int) -> float:
    """The DP-FedAvg noise multiplier whose epsilon after ``rounds`` rounds is ``target``
    (uniform sampling): the smallest found by bisection on the accountant."""
    def eps(z):
        return Accountant(gaussian_round(z, num_clients, clients_per_round), delta).epsilon(rounds)

    low, high = 1e-3, 1.0
    while eps(high) > target:
        low, high = high, high * 2
    while high - low > 1e-6 * high:  # about 20 steps: each is a full accountant evaluation
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > target else (low, mid)
    return high


def entry_epsilon_for(target: float, delta: float, rounds: int, entries: int) -> float:
    """The per-entry randomized-response epsilon whose whole-mask epsilon after ``rounds``
    rounds is ``target``: the largest found by bisection on the accountant."""
    def eps(e):
        return Accountant(randomized_response_round(e, entries), delta).epsilon(rounds)

    low, high = 0.0, target
    for _ in range(60):  # fast: randomized response's RDP is closed-form
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) <= target else (low, mid)
    return low


class PrivacyLedger(HostHook):
    """Records each round's epsilon; limits the rounds to a target epsilon."""

    def __init__(self, accountant: Accountant, what: str, target: float, rounds: int, extra: dict):
        self.accountant, self.what, self.target, self.rounds, self.extra = accountant, what, target, rounds, extra
        self._limit = None
        if target > 0:
            self._limit = accountant.rounds_within(target, rounds)
            if self._limit == 0:
                raise ValueError(f"--target_epsilon={target:g}: a single round already spends epsilon "
                                 f"{accountant.epsilon(1):.3g} at --dp_delta={accountant.delta:g} "
                                 f"({what}); raise the target or the noise")

    def header(self) -> str:
        limit = f"; stops after round {self._limit} (--target_epsilon={self.target:g})" \
            if self._limit is not None and self._limit < self.rounds else ""
        return (f"privacy: {self.what}; epsilon after {self.rounds} rounds "
                f"{self.accountant.epsilon(self.rounds):.3g} at delta {self.accountant.delta:g}{limit}")

    def rounds_limit(self) -> int | None:
        return self._limit

    def after_round(self, round_index, output, ticket) -> dict:
        return {"epsilon": self.accountant.epsilon(round_index + 1)}

    def finish(self, server, history) -> dict:
        done = history.rounds_done
        out = {"epsilon": self.accountant.epsilon(done) if done else 0.0, "dp_delta": self.accountant.delta,
               **self.extra}
        if self._limit is not None:
            out["stopped_at_target_epsilon"] = done == self._limit and self._limit < self.rounds
        return out


def _check_delta(delta: float, num_clients: int) -> None:
    if not delta < 1.0 / num_clients:
        raise ValueError(f"--dp_delta={delta:g} must be below 1/--num_clients = {1.0 / num_clients:g}: "
                         "a delta that large allows publishing one client's data outright")


def accountant_hooks(ctx: HostContext) -> list[HostHook]:
    """The privacy ledger of a run whose method adds DP noise (none otherwise)."""
    cfg = ctx.config
    z = getattr(cfg, "dp_noise_multiplier", 0.0)
    entry_eps = getattr(cfg, "mask_rr_epsilon", 0.0)
    if z > 0:
        if not ctx.synchronous:
            raise ValueError("DP-FedAvg (--dp_noise_multiplier) needs --aggregation=sync: its accounting "
                             "assumes each round's clients are sampled together, not refilled as they finish")
        _check_delta(cfg.dp_delta, ctx.num_clients)
        event = gaussian_round(z, ctx.num_clients, ctx.clients_per_round, ctx.uniform_sampling)
        sampled = ctx.uniform_sampling and ctx.clients_per_round < ctx.num_clients
        what = (f"DP-FedAvg, noise multiplier {z:g}, clip {cfg.dp_clip:g}"
                f"{' (adaptive)' if cfg.dp_clip_quantile else ''}, "
                f"{'sampling ' + str(ctx.clients_per_round) + ' of ' + str(ctx.num_clients) if sampled else 'no sampling amplification'}")
        return [PrivacyLedger(Accountant(event, cfg.dp_delta), what, cfg.target_epsilon, ctx.rounds,
                              {"dp_noise_multiplier": z})]
    if entry_eps > 0:
        _check_delta(cfg.dp_delta, ctx.num_clients)
        n = ctx.algorithm.num_params
        what = (f"randomized response on each of {n:,} mask entries, epsilon {entry_eps:g} per entry "
                f"(flip probability {flip_probability(entry_eps):.4g}), every round counted")
        return [PrivacyLedger(Accountant(randomized_response_round(entry_eps, n), cfg.dp_delta), what,
                              cfg.target_epsilon, ctx.rounds, {"epsilon_per_entry": entry_eps})]
    return []
