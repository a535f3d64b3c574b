"""A run's history (history.py): records in order, what the summary reads from them (totals,
means, last evaluation, the round it diverged), and the JSON a checkpoint keeps."""

import json
import math

import pytest

from fedmask_jax.history import History, RoundRecord, finite


def _history(*records: RoundRecord) -> History:
    history = History()
    for record in records:
        history.append(record)
    return history


def _three_rounds() -> History:
    return _history(
        RoundRecord(1, {"train_loss": 2.0, "uplink_bpp": 1.0, "cumulative_uplink_bits": 10.0,
                        "round_time_s": 0.5}),
        RoundRecord(2, {"train_loss": 1.5, "uplink_bpp": 0.5, "uplink_bpp_coded": 0.25,
                        "cumulative_uplink_bits": 15.0, "round_time_s": 0.25},
                    {"test_accuracy": 0.5, "test_loss": 1.2}),
        RoundRecord(3, {"train_loss": 1.0, "uplink_bpp": 0.75, "uplink_bpp_coded": 0.5,
                        "cumulative_uplink_bits": 22.0, "cumulative_uplink_bits_coded": 3.0,
                        "round_time_s": 0.75}),
    )


def test_an_empty_history_has_done_nothing():
    history = History()
    assert history.rounds_done == 0
    assert history.totals() == {}
    assert history.last_evaluation() == {}
    assert history.diverged_at() is None
    assert history.values("train_loss") == [] and history.round_times() == []
    assert history.means(("uplink_bpp",)) == {}


def test_records_must_follow_each_other():
    history = _three_rounds()
    assert history.rounds_done == 3
    with pytest.raises(ValueError, match="round 5 after round 3"):
        history.append(RoundRecord(5, {}))
    with pytest.raises(ValueError, match="round 3 after round 3"):
        history.append(RoundRecord(3, {}))
    assert history.rounds_done == 3 and len(history.records) == 3


def test_a_resumed_history_may_start_at_any_round():
    history = _history(RoundRecord(4, {}), RoundRecord(5, {}))
    assert history.rounds_done == 5


def test_flat_is_round_then_fields_then_evaluation():
    record = RoundRecord(2, {"train_loss": 1.5, "a": 1}, {"test_accuracy": 0.5})
    assert record.flat() == {"round": 2, "train_loss": 1.5, "a": 1, "test_accuracy": 0.5}
    assert list(record.flat()) == ["round", "train_loss", "a", "test_accuracy"]
    assert RoundRecord(1, {"x": 0}).flat() == {"round": 1, "x": 0}


def test_totals_are_the_last_rounds_cumulative_fields():
    assert _three_rounds().totals() == {"cumulative_uplink_bits": 22.0, "cumulative_uplink_bits_coded": 3.0}


def test_values_and_means_skip_rounds_without_the_field():
    history = _three_rounds()
    assert history.values("uplink_bpp_coded") == [0.25, 0.5]
    assert history.round_times() == [0.5, 0.25, 0.75]
    assert history.means(("uplink_bpp", "downlink_bpp")) == {
        "mean_uplink_bpp": 0.75, "mean_uplink_bpp_coded": 0.375}


def test_last_evaluation_is_the_latest_evaluated_round():
    assert _three_rounds().last_evaluation() == {"test_accuracy": 0.5, "test_loss": 1.2}


def test_diverged_at_is_the_first_round_marked_diverged():
    history = _history(RoundRecord(1, {"diverged": False}), RoundRecord(2, {"diverged": True}),
                       RoundRecord(3, {"diverged": True}))
    assert [r.diverged for r in history.records] == [False, True, True]
    assert history.diverged_at() == 2
    assert _three_rounds().diverged_at() is None


def test_json_round_trip_keeps_every_record():
    history = _three_rounds()
    data = json.loads(json.dumps(history.to_json()))
    assert data[1] == {"round": 2, "fields": history.records[1].fields,
                       "evaluation": {"test_accuracy": 0.5, "test_loss": 1.2}}
    back = History.from_json(data)
    assert back == history
    assert back.rounds_done == 3 and back.totals() == history.totals()
    back.append(RoundRecord(4, {}))  # a restored history goes on where it stopped
    assert History.from_json([{"round": "1", "fields": {}}]).records == [RoundRecord(1, {}, None)]


@pytest.mark.parametrize("value, expected", [(1, True), (0.5, True), (math.nan, False), (math.inf, False),
                                             (-math.inf, False), (None, False), ("1", False)])
def test_finite_is_a_finite_number(value, expected):
    assert finite(value) is expected
