"""Splitting a training set among clients: iid, the reference's non-IID, Dirichlet label skew.

All partitioners are host-side numpy, seeded, and return one index array per client.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("iid", "noniid", "dirichlet")


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Equal random shards (sizes differ by at most one)."""
    return [np.sort(s) for s in np.array_split(rng.permutation(len(labels)), num_clients)]


def reference_client_sizes(total: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """Client sizes proportional to randint(10, 100), summing to ``total`` (the reference)."""
    weights = rng.integers(10, 100, num_clients)
    sizes = np.floor(weights / weights.sum() * total).astype(int)
    sizes[-1] += total - sizes.sum()
    return sizes


def classes_per_client_split(labels: np.ndarray, num_clients: int, classes_per_client: int,
                             rng: np.random.Generator) -> list[np.ndarray]:
    """The reference's non-IID split.

    Client sizes follow ``reference_client_sizes``. Each client starts at a random class and
    takes up to size/classes_per_client examples of it, then of the next class (cyclically),
    until its budget is met -- so it holds about ``classes_per_client`` consecutive classes
    (more when a class pool has run dry). Examples are never shared between clients.
    """
    num_classes = int(labels.max()) + 1
    sizes = reference_client_sizes(len(labels), num_clients, rng)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(num_classes)]
    clients = []
    for size in sizes:
        per_class = max(1, size // classes_per_client)
        budget, c, taken = int(size), int(rng.integers(num_classes)), []
        while budget > 0 and any(pools):
            take = min(per_class, len(pools[c]), budget)
            taken += pools[c][:take]
            pools[c] = pools[c][take:]
            budget -= take
            c = (c + 1) % num_classes
        clients.append(np.sort(np.array(taken, np.int64)))
    return clients


def dirichlet_split(labels: np.ndarray, num_clients: int, alpha: float,
                    rng: np.random.Generator, min_size: int = 1,
                    max_tries: int = 100) -> list[np.ndarray]:
    """Label skew: each class is divided among clients in Dirichlet(alpha) proportions.

    Redrawn until every client holds at least ``min_size`` examples.
    """
    num_classes = int(labels.max()) + 1
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for c in range(num_classes):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(idx)).astype(int)
            for shard, part in zip(shards, np.split(idx, cuts)):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.array(s, np.int64)) for s in shards]
    raise ValueError(
        f"--dirichlet_alpha={alpha} with --num_clients={num_clients} left some client with "
        f"fewer than {min_size} examples in {max_tries} draws; raise --dirichlet_alpha or "
        "lower --num_clients")


def partition(labels: np.ndarray, num_clients: int, split: str, *, seed: int,
              classes_per_client: int = 2, dirichlet_alpha: float = 0.5,
              max_examples_per_client: int | None = None) -> list[np.ndarray]:
    """Returns one array of example indices per client."""
    rng = np.random.default_rng(seed)
    if split == "iid":
        parts = iid(labels, num_clients, rng)
    elif split == "noniid":
        parts = classes_per_client_split(labels, num_clients, classes_per_client, rng)
    elif split == "dirichlet":
        parts = dirichlet_split(labels, num_clients, dirichlet_alpha, rng)
    else:
        raise ValueError(f"unknown --split {split!r}; expected one of {SPLITS}")
    if max_examples_per_client:
        parts = [p if len(p) <= max_examples_per_client
                 else np.sort(rng.choice(p, max_examples_per_client, replace=False))
                 for p in parts]
    return parts
