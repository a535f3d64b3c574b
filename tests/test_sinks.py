"""The sinks on hand-written records: the console line and summary line each method's declared
fields give (``MethodSpec.shows``), metrics.jsonl and its repair on resume. Nothing compiles."""

import io
import json
import math

import pytest

from fedmask_jax import sinks
from fedmask_jax.algorithms import registry
from fedmask_jax.algorithms.shows import Column, SecondAccuracy, Shows
from fedmask_jax.history import History, RoundRecord

MASK = registry.spec("fedpm").shows
DENSE = registry.spec("fedavg").shows

ROUND = {"round": 3, "test_accuracy": 0.81234, "test_loss": 0.5, "train_loss": 0.4567, "uplink_bpp": 0.99,
         "round_time_s": 1.234, "reported_clients": 3}
MASK_FIELDS = {"test_accuracy_thresholded": 0.8, "uplink_bpp_coded_global": 0.88, "uplink_bpp_coded_prior": 0.71,
               "verified_clients": 3, "mask_density": 0.49}
SUMMARY = {"algorithm": "fedpm", "final_test_accuracy": 0.8, "mean_uplink_bpp": 1.0, "total_time_s": 5.0,
           "steady_round_time_s": 1.0, "workdir": "/runs/x"}
MASK_SUMMARY = {"final_test_accuracy_thresholded": 0.7, "final_model_bpp": 0.9, "final_model_file_bpp": 0.95,
                "mean_uplink_bpp_coded_global": 0.7, "mean_uplink_bpp_coded_prior": 0.6,
                "mean_uplink_bpp_measured_prior": 0.61, "verified_clients_total": 12}


def test_a_dense_method_shows_every_runs_fields():
    assert DENSE == Shows()
    assert sinks.progress_line(ROUND, 10, 33.0, DENSE) == (
        "round    3/10 | acc 0.8123 | test loss 0.500 | train loss 0.457 | bpp 0.990 | 1.23s/round | ETA 33s")


def test_the_simulated_clock_is_shown_where_the_record_has_it():
    assert sinks.progress_line({**ROUND, "sim_time_s": 754.2}, 10, 33.0, DENSE) == (
        "round    3/10 | acc 0.8123 | test loss 0.500 | train loss 0.457 | bpp 0.990 | sim 12m34s | 1.23s/round "
        "| ETA 33s")
    assert _summary_line({**SUMMARY, "algorithm": "fedavg", "sim_time_s": 30.0}, DENSE) == (
        "done: fedavg test accuracy 0.8000, mean uplink 1.0000 bpp, 30.0s simulated; 5.0s total, 1.00s/round; "
        "results in /runs/x\n")


def test_a_mask_method_shows_its_declared_fields_in_their_order():
    line = sinks.progress_line({**ROUND, **MASK_FIELDS, "epsilon": 12.345}, 10, 75.0, MASK)
    assert line == ("round    3/10 | acc 0.8123 (thr 0.8000) | test loss 0.500 | train loss 0.457 | bpp 0.990 | "
                    "coded 0.880/0.710 | checked 3 | density 0.490 | eps 12.3 | 1.23s/round | ETA 1m15s")


def test_declared_fields_a_round_lacks_are_left_out():
    # a mask run without --coded_uplink, and a round without an evaluation
    line = sinks.progress_line({**ROUND, "mask_density": 0.5}, 10, 0.0, MASK)
    assert "coded" not in line and "checked" not in line and "density 0.500" in line
    unevaluated = {k: v for k, v in {**ROUND, **MASK_FIELDS}.items() if not k.startswith("test_")}
    assert not sinks.progress_line(unevaluated, 10, 0.0, MASK).split(" | ")[1].startswith("acc")


def test_the_sink_knows_no_field_of_a_method_that_does_not_declare_it():
    # FedPM's fields in a record of a method that does not declare them are not shown
    line = sinks.progress_line({**ROUND, **MASK_FIELDS}, 10, 0.0, DENSE)
    assert "thr" not in line and "coded" not in line and "density" not in line


def test_a_new_method_shows_a_new_field_by_declaring_it():
    shows = Shows(columns=(Column("kl", "kl", "{:.2f} nats"), Column("ratio", "ratio", "{}/{of}")),
                  accuracy_also=SecondAccuracy("test_accuracy_ema", "ema", "averaged", "ema", "last"))
    line = sinks.progress_line({**ROUND, "kl": 1.234, "ratio": 2, "of": 5, "test_accuracy_ema": 0.5}, 10, 0.0, shows)
    assert "acc 0.8123 (ema 0.5000)" in line and "| kl 1.23 nats | ratio 2/5 |" in line


def _summary_line(summary, shows, **kw):
    out = io.StringIO()
    console = sinks.Console(10, out, shows=shows, **kw)
    console.close(summary)
    return out.getvalue()


def test_summary_line_of_a_dense_run():
    assert _summary_line({**SUMMARY, "algorithm": "fedavg"}, DENSE) == (
        "done: fedavg test accuracy 0.8000, mean uplink 1.0000 bpp; 5.0s total, 1.00s/round; results in /runs/x\n")


def test_summary_line_of_a_mask_run_with_every_declared_figure():
    assert _summary_line({**SUMMARY, **MASK_SUMMARY}, MASK) == (
        "done: fedpm test accuracy 0.8000 (thresholded 0.7000), mean uplink 1.0000 bpp, final model 0.9000 bpp "
        "(file 0.9500 bpp), coded uplink 0.7000 bpp global / 0.6000 bpp with theta_g (range coder: 0.6100 on "
        "12 masks); 5.0s total, 1.00s/round; results in /runs/x\n")
    # the figures a run did not produce (no export, no range-coder check) are left out
    partial = {k: v for k, v in MASK_SUMMARY.items() if k not in ("final_model_file_bpp", "mean_uplink_bpp_measured_prior")}
    text = _summary_line({**SUMMARY, **partial}, MASK)
    assert "(file" not in text and "range coder" not in text and "final model 0.9000 bpp, coded" in text


def test_a_failed_run_prints_no_summary_line():
    assert _summary_line(None, MASK) == ""


def test_console_prints_header_notes_and_a_line_per_round_with_an_eta():
    out = io.StringIO()
    console = sinks.Console(4, out, notes=("resume: note",), shows=MASK)
    console.open(["header"])
    for r, t in ((1, 2.0), (2, 4.0)):
        console.round({**ROUND, **MASK_FIELDS, "round": r, "round_time_s": t}, evaluated=True)
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["header", "resume: note"]
    assert "(thr 0.8000)" in lines[2] and lines[2].endswith("ETA 6s")  # 2 s * 3 rounds left
    assert lines[3].endswith("ETA 6s")  # median of 2 and 4 s * 2 rounds left


def test_default_sinks_give_the_console_and_plots_the_methods_declaration(tmp_path):
    built = sinks.default_sinks(str(tmp_path), 5, History(), verbose=True, tensorboard=False, shows=MASK)
    kinds = [type(s).__name__ for s in built]
    assert kinds == ["Console", "MetricsJsonl", "Plots", "SummaryFile"]  # the summary file last
    assert built[0].shows is MASK and built[2].shows is MASK
    built[1].close(None)
    quiet = sinks.default_sinks(str(tmp_path), 5, History(), verbose=False, tensorboard=False)
    assert [type(s).__name__ for s in quiet] == ["MetricsJsonl", "Plots", "SummaryFile"]
    quiet[0].close(None)
    unplotted = sinks.default_sinks(str(tmp_path), 5, History(), verbose=False, tensorboard=False, plots=False)
    assert [type(s).__name__ for s in unplotted] == ["MetricsJsonl", "SummaryFile"]
    unplotted[0].close(None)


def test_metrics_jsonl_writes_evaluated_rounds_as_strict_sorted_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = sinks.MetricsJsonl(str(path))
    assert log.repaired is None
    log.round({"round": 1, "z": 1.0, "a": math.nan}, evaluated=True)
    log.round({"round": 2, "z": 2.0}, evaluated=False)
    # each line is on disk as soon as it is written: a crash loses at most the line being written
    assert path.read_text() == '{"a": null, "round": 1, "z": 1.0}\n'
    log.round({"round": 3, "z": math.inf}, evaluated=True)
    log.close(None)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"a": None, "round": 1, "z": 1.0}, {"round": 3, "z": None}]


def test_a_fresh_run_starts_metrics_jsonl_afresh(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1, "old": 1}\n')
    log = sinks.MetricsJsonl(str(path), History())
    log.close(None)
    assert log.repaired is None and path.read_text() == ""


def test_resume_repair_names_every_kind_of_damage_at_once(tmp_path):
    history = History([RoundRecord(r, {"x": r}, {"test_accuracy": r / 10}) for r in (1, 2, 3, 4)])
    rows = [json.dumps(r.flat(), sort_keys=True) for r in history.records]
    path = tmp_path / "metrics.jsonl"
    # round 2 lost, round 3 changed, round 4 twice, a garbled line, then a killed run's
    # round 5 (after the checkpoint: dropped silently) and a torn last line
    path.write_text("\n".join([rows[0], rows[2].replace('"x": 3', '"x": 9'), rows[3], rows[3], "{oops",
                               '{"round": 5, "x": 5}', '{"round": 6, "x']))
    log = sinks.MetricsJsonl(str(path), history)
    log.round({"round": 5, "x": 5}, evaluated=True)
    log.close(None)
    assert log.repaired == ("resume: rewrote metrics.jsonl from the checkpoint's history: round 2 missing; "
                            "round 3 differed; round 4 repeated; 1 unreadable line dropped")
    assert path.read_text().splitlines() == [*rows, '{"round": 5, "x": 5}']


def test_resume_note_reaches_the_console(tmp_path):
    history = History([RoundRecord(1, {"x": 1}, {"test_accuracy": 0.1})])
    out = io.StringIO()
    built = sinks.default_sinks(str(tmp_path), 3, history, verbose=True, tensorboard=False, console=out)
    built[0].open(["header"])
    built[1].close(None)
    assert out.getvalue().splitlines() == [
        "header", "resume: rewrote metrics.jsonl from the checkpoint's history: round 1 missing"]


@pytest.mark.parametrize("rounds, text", [([3], "round 3"), ([1, 2, 3, 4, 7], "rounds 1-4, 7"),
                                          ([2, 4], "rounds 2, 4")])
def test_rounds_are_shortened_to_spans(rounds, text):
    assert sinks._rounds(rounds) == text
