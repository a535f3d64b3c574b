"""FedPM's work on the host: real range coding that checks the device's code lengths, and
the final model file.

The round computes every client's exact code lengths on the device
(``masks.codecs.coded_bits_prior`` / ``coded_bits_global``) and aggregates the device sums. Real
range coding is the check that those figures and messages are right: each round a fixed
number of clients' masks (``--verify_coded_clients``) are collected from the round, coded with
``constriction``, decoded and compared, in the background (worker processes where there are
spare cores), overlapping the next round.
A decoded mask that differs, a measured size above what the range coder may take for its ideal
(``coding.max_bits``: 0.1 %, the 64-bit flush and 2^-11 bits an entry), or a device figure that
disagrees with the host's stops the run.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from fedmask_jax import coding, keys, masking
from fedmask_jax import export as export_lib
from fedmask_jax.algorithms.base import HostContext, HostHook, RunFault
from fedmask_jax.config import setting

# The device's float32 code lengths agree with the host's float64 ones to this fraction.
DEVICE_AGREEMENT = 1e-4

EXPORT_MASKS = ("auto", "sampled", "thresholded", "none")


def _verify_count(value: str) -> str | None:
    if value == "all" or (value.isdigit() and int(value) >= 0):
        return None
    return f"must be a number of clients (0, 1, 2, ...) or 'all', got {value!r}"


# One declaration for methods whose default differs (klms: off, its message is no mask).
def coded_uplink_setting(default: bool):
    return setting(default, "Range-code uplink masks for real (constriction) on the host, off the critical "
                   "path, to verify the exact code lengths the round computes on the device.")


@dataclasses.dataclass(frozen=True)
class CodingCheckConfig:
    """The host's range-coding check of the uplink masks."""

    coded_uplink: bool = coded_uplink_setting(True)
    verify_coded_clients: str = setting(
        "10", "With --coded_uplink: clients per round whose masks are range-coded, decoded and "
        "checked (a number, or 'all').", check=_verify_count)

    def verified_clients(self, cohort_size: int) -> int:
        """How many clients' masks are range-coded and checked each round."""
        if not self.coded_uplink:
            return 0
        if self.verify_coded_clients == "all":
            return cohort_size
        return min(int(self.verify_coded_clients), cohort_size)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """The final model file."""

    export_mask: str = setting("auto", "The final model file <workdir>/model.fmjx: one mask sampled "
                               "from theta_g, or 1[theta_g > 0.5], or none (auto: sampled for "
                               "fedpm, thresholded for fedmask).", choices=EXPORT_MASKS)


def hooks(ctx: HostContext) -> list[HostHook]:
    out: list[HostHook] = []
    count = ctx.config.verified_clients(ctx.clients_per_round)
    if count:
        out.append(UplinkCodingCheck(ctx, count))
    out.append(FinalModel(ctx))
    return out


def _flat_theta(server) -> jax.Array:
    return jnp.concatenate([t.ravel() for t in jax.tree.leaves(masking.keep_probabilities(server.scores))])


def coding_workers(count: int) -> int:
    """Processes for the coding check: one per spare core (constriction holds the GIL, so
    threads would take turns), at most one per mask; 1 means a thread, no process."""
    return max(1, min(count, (os.cpu_count() or 1) - 1))


class UplinkCodingCheck(HostHook):
    """Range-codes, decodes and checks ``count`` collected masks per round, off the critical
    path; records their measured sizes beside the device's ideal ones."""

    def __init__(self, ctx: HostContext, count: int, workers: int | None = None):
        coding.encode(np.zeros(8, np.uint8), 0.5)  # constriction is importable: fail now, not later
        self.collect = count
        self.n = ctx.algorithm.num_params
        self.k = ctx.clients_per_round
        self.workers = workers or coding_workers(count)
        self._theta = jax.jit(_flat_theta)
        # A coordinator thread per round; the coding itself in worker processes when there
        # are spare cores (spawned: they import numpy and constriction, not this process).
        self._rounds = ThreadPoolExecutor(1, thread_name_prefix="fedpm-coding-check")
        self._coders = (ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
                        if self.workers > 1 else None)

    def header(self) -> str:
        where = f"{self.workers} worker processes" if self._coders else "a background thread"
        return (f"uplink coding check: {self.collect} of {self.k} clients' masks per round range-coded, "
                f"decoded and compared with the device's code lengths ({where})")

    def before_round(self, round_index, server):
        return self._theta(server)  # what this round's clients receive, before it is donated

    def after_round(self, round_index, output, theta) -> Future | dict:
        collected = output.collected
        filled = min(self.collect, int(output.metrics["reported_clients"]))  # the rest are empty slots
        if not filled:
            return {"verified_clients": 0}
        return self._rounds.submit(self._check, round_index + 1, theta, collected.payload[:filled],
                                   collected.metrics["uplink_bpp_coded_prior"][:filled],
                                   collected.metrics["uplink_bpp_coded_global"][:filled])

    def _check(self, round_number, theta, payload, device_prior, device_global) -> dict:
        n = self.n
        theta, payload = np.asarray(theta, np.float64), np.asarray(payload)
        if self._coders is None:
            results = coding.check_masks(payload, theta, n)
        else:
            groups = np.array_split(np.arange(len(payload)), self.workers)
            futures = [self._coders.submit(coding.check_masks, payload[g], theta, n) for g in groups if len(g)]
            results = [r for f in futures for r in f.result()]
        device = {"prior": np.asarray(device_prior, np.float64) * n,
                  "global": np.asarray(device_global, np.float64) * n}
        for i, r in enumerate(results):
            if not r["lossless"]:
                raise RunFault(f"round {round_number}: a client's uplink mask did not survive range "
                               "coding (decoded mask differs from the one sent)")
            for code in ("prior", "global"):
                size, ideal = r[f"{code}_bits"], r[f"ideal_{code}"]
                if abs(device[code][i] - ideal) > DEVICE_AGREEMENT * ideal + 1.0:
                    raise RunFault(
                        f"round {round_number}: the round's {code}-code length of a client's mask "
                        f"({device[code][i]:.1f} bits) differs from the host's ({ideal:.1f} bits)")
                if size > coding.max_bits(ideal, n):
                    raise RunFault(f"round {round_number}: the {code} range code of a client's mask took "
                                   f"{size} bits, more than the {coding.max_bits(ideal, n):.1f} a range "
                                   f"coder may take for its ideal {ideal:.1f}")
        measured_prior = sum(r["prior_bits"] for r in results)
        return {"verified_clients": len(results),
                "uplink_bpp_measured_prior": measured_prior / len(results) / n,
                "uplink_bpp_measured_global": sum(r["global_bits"] for r in results) / len(results) / n,
                # measured over ideal size of the sent (theta_g-coded) masks, minus one
                "uplink_coding_overhead": measured_prior / sum(r["ideal_prior"] for r in results) - 1.0}

    def finish(self, server, history) -> dict:
        return {"verified_clients_total": int(sum(history.values("verified_clients"))),
                "max_uplink_coding_overhead": max(history.values("uplink_coding_overhead"), default=None)}

    def close(self) -> None:
        self._rounds.shutdown(wait=True, cancel_futures=True)
        if self._coders is not None:
            self._coders.shutdown(wait=True, cancel_futures=True)


@jax.jit
def _final_mask_counts(scores, key):
    """theta_g's leaves, and per leaf the ones of a mask sampled from it (leaf i with
    fold_in(key, i)) and of the thresholded mask: one program, where eager ops would compile
    two per leaf shape."""
    theta = jax.tree.leaves(masking.keep_probabilities(scores))
    sampled = [jnp.sum(jax.random.bernoulli(jax.random.fold_in(key, i), t)) for i, t in enumerate(theta)]
    return theta, sampled, [jnp.sum(t > 0.5) for t in theta]


class FinalModel(HostHook):
    """At the end: the ideal size of the final model's mask, and the model file (seed +
    architecture + one range-coded mask) in the workdir."""

    def __init__(self, ctx: HostContext):
        self.ctx = ctx
        cfg = ctx.config
        self.kind = ("thresholded" if cfg.deterministic else "sampled") \
            if cfg.export_mask == "auto" else cfg.export_mask

    def finish(self, server, history) -> dict:
        ctx = self.ctx
        n = ctx.algorithm.num_params
        theta, sampled, thresholded = _final_mask_counts(server.scores, keys.stream(ctx.seed, keys.FINAL_MODEL_SIZE))
        sampled, thresholded = (sum(int(c) for c in counts) for counts in (sampled, thresholded))
        bits = lambda ones: float(masking.mask_bits(jnp.float32(ones), n)) / n  # noqa: E731
        out = {"final_model_bpp": bits(sampled), "final_model_bpp_thresholded": bits(thresholded)}
        if self.kind != "none" and ctx.workdir is not None:
            out.update(self._export(np.concatenate([np.asarray(t).ravel() for t in theta])))
        return out

    def _export(self, theta: np.ndarray) -> dict:
        ctx, arch = self.ctx, self.ctx.architecture
        if self.kind == "thresholded":
            mask = (theta > 0.5).astype(np.uint8)
        else:
            key = keys.stream(ctx.seed, keys.FINAL_MODEL_FILE)
            mask = np.asarray(jax.random.bernoulli(key, jnp.asarray(theta))).astype(np.uint8)
        architecture = {"name": arch.name, "num_classes": arch.num_classes, "width": arch.width,
                        "mlp_hidden": list(arch.mlp_hidden), "weight_init": ctx.config.weight_init,
                        "mask_gradient": ctx.config.mask_gradient}
        path = os.path.join(ctx.workdir, "model.fmjx")
        size = export_lib.export_model(path, architecture=architecture, input_shape=arch.input_shape,
                                       seed=ctx.seed, mask_flat=mask, mask_kind=self.kind)
        return {"final_model_file": path, "final_model_file_bytes": size,
                "final_model_file_bpp": 8.0 * size / ctx.algorithm.num_params}
