"""A run's history: one record per finished round, what the summary and a resume need."""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

SIM_TIME = "sim_time_s"  # the run's simulated clock at the end of a round (a running total)


@dataclasses.dataclass
class RoundRecord:
    """One round: the round's metrics and the host's fields, and its evaluation if it had one."""

    round: int  # 1-based
    fields: dict[str, Any]
    evaluation: dict[str, float] | None = None

    def flat(self) -> dict[str, Any]:
        """The record as one flat dict (what metrics.jsonl and the sinks see)."""
        return {"round": self.round, **self.fields, **(self.evaluation or {})}

    @property
    def diverged(self) -> bool:
        return bool(self.fields.get("diverged"))


@dataclasses.dataclass
class History:
    records: list[RoundRecord] = dataclasses.field(default_factory=list)

    def append(self, record: RoundRecord) -> None:
        expected = self.records[-1].round + 1 if self.records else record.round
        if record.round != expected:
            raise ValueError(f"history: round {record.round} after round {expected - 1}")
        self.records.append(record)

    @property
    def rounds_done(self) -> int:
        return self.records[-1].round if self.records else 0

    def last_evaluation(self) -> dict[str, float]:
        for record in reversed(self.records):
            if record.evaluation is not None:
                return record.evaluation
        return {}

    def values(self, key: str) -> list:
        return [r.fields[key] for r in self.records if key in r.fields]

    def means(self, prefixes: tuple[str, ...]) -> dict[str, float]:
        """``mean_<key>`` over the rounds that have it, for every field named with a prefix."""
        keys = sorted({k for r in self.records for k in r.fields if k.startswith(prefixes)})
        return {f"mean_{k}": float(statistics.fmean(self.values(k))) for k in keys}

    def round_times(self) -> list[float]:
        return self.values("round_time_s")

    def diverged_at(self) -> int | None:
        return next((r.round for r in self.records if r.diverged), None)

    def totals(self) -> dict[str, float]:
        """The running fields of the last round, ``cumulative_*`` and the simulated clock
        (0 before any round)."""
        if not self.records:
            return {}
        return {k: v for k, v in self.records[-1].fields.items() if k.startswith("cumulative_") or k == SIM_TIME}

    def to_json(self) -> list[dict]:
        return [dataclasses.asdict(r) for r in self.records]

    @classmethod
    def from_json(cls, data: list[dict]) -> "History":
        return cls([RoundRecord(int(d["round"]), dict(d["fields"]), d.get("evaluation")) for d in data])


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
