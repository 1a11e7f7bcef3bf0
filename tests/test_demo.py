"""`ht demo` end to end, in a reduced configuration (the full one is the README's main job),
and the report's sentences, which must follow from its numbers."""

import json
import math
import statistics

import pytest
from PIL import Image
from typer.testing import CliRunner

import htcli.cli.output
from htcli.cli import app
from htcli.demo import findings
from htcli.methods.predict import Predictor, shipped_checkpoint

CAPTURE = 0.5  # seconds to capture a concept's target activations


def _row(method, residual, seconds, ht_seconds):
    """A `compare` row: a baseline's time from the text adds the capture to its fit."""
    total = seconds if method == "hypertransport" else seconds + CAPTURE
    return {"method": method, "residual_mean": residual, "seconds_median": seconds, "seconds_total": total,
            "capture_seconds": CAPTURE, "times_ht": total / ht_seconds}


def _rows(ht, ht_seconds, lineas=0.5, mean_shift=0.8):
    return [_row("none", 1.0, 0.0, ht_seconds), _row("mean-shift", mean_shift, 0.01, ht_seconds),
            _row("lineas", lineas, 2.0, ht_seconds), _row("hypertransport", ht, ht_seconds, ht_seconds)]


def test_findings_when_hypertransport_wins():
    lines = findings(_rows(ht=0.4, ht_seconds=0.002), train_seconds=100.0)
    assert "lowers the held-out residual ratio to 0.400" in lines[0]
    assert "matches or beats every per-concept baseline (the best, lineas, reaches 0.500)" in lines[1]
    assert ("1,250x faster than LinEAS from the text (2.50 s: 0.50 s to capture the concept's target activations, "
            "2.00 s to fit)") in lines[2]
    assert "mean-shift, fits in 10.00 ms but needs the captured targets too: 510 ms from the text, 255.0x" in lines[3]
    assert f"paid back after {math.ceil(100 / (2.5 - 0.002))} new concepts." in lines[4]


def test_findings_when_a_baseline_wins_or_nothing_helps():
    lines = " ".join(findings(_rows(ht=0.6, ht_seconds=0.002), train_seconds=100.0))
    assert "The best method here is lineas (0.500)" in lines and "HyperTransport's is 1.20x as large" in lines
    assert "paid back after 41 new concepts, at 1.20x LinEAS's residual ratio" in lines
    lines = " ".join(findings(_rows(ht=1.05, ht_seconds=0.002), train_seconds=100.0))
    assert "does not beat no steering" in lines and "does not pay for itself" in lines and "paid back" not in lines
    lines = " ".join(findings(_rows(ht=0.4, ht_seconds=3.0), train_seconds=100.0))
    assert "no faster than LinEAS from the text" in lines and "predicting is not faster than fitting" in lines


def _table(report: str) -> dict[str, list[str]]:
    """The Markdown comparison table of report.md, by method."""
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


def test_demo_reduced_runs_and_reports_honestly(tmp_path, monkeypatch):
    monkeypatch.setattr(htcli.cli.output, "PLAIN_EVERY_S", 0.0)  # a progress line for every step
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--retrain", "--train-concepts", "10",
                                      "--test-concepts", "2", "--train-steps", "10", "--lineas-steps", "5"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert "random weights" in report and "activation space" in report
    rows = {row["method"]: row for row in summary["rows"]}
    assert list(rows) == ["none", "mean-shift", "linear-act", "lineas", "hypertransport"]

    # Sane numbers: every fitted baseline does better than no steering on held-out samples, and
    # each mean is the mean of its per-concept residuals.
    assert rows["none"]["residual_mean"] == 1.0
    for method in ("mean-shift", "linear-act", "lineas"):
        assert rows[method]["residual_mean"] < 1.0, method
    for method, per_concept in summary["per_concept"].items():
        assert list(per_concept) == summary["test_concepts"]
        assert rows[method]["residual_mean"] == pytest.approx(statistics.fmean(per_concept.values()), abs=1e-12)

    # report.md shows the summary's numbers.
    table = _table(report)
    assert set(table) == set(rows)
    for method, row in rows.items():
        assert float(table[method][2].split()[0]) == pytest.approx(row["residual_mean"], abs=5e-4)
        if method != "none":
            assert float(table[method][3]) == pytest.approx(row["seconds_total"], rel=5e-3, abs=1e-12)
            assert float(table[method][4]) == pytest.approx(row["seconds_median"], rel=5e-3, abs=1e-12)
    # A baseline's time from the text is its capture (measured in this run) plus its fit.
    capture = rows["mean-shift"]["capture_seconds"]
    assert capture > 0 and all(rows[m]["capture_seconds"] == capture for m in ("linear-act", "lineas"))
    for method in ("mean-shift", "linear-act", "lineas"):
        assert rows[method]["seconds_total"] == pytest.approx(capture + rows[method]["seconds_median"])
    assert rows["hypertransport"]["seconds_total"] == rows["hypertransport"]["seconds_median"]
    assert table["none"][3:] == ["-", "-", "-"]

    # One count of training concepts, said the same way in the progress and the report.
    fit, val = summary["fit_concepts"], summary["val_concepts"]
    assert fit + val == 10 and val == 1
    said = f"10 training concepts ({fit} to fit, {val} for validation)"
    progress = [line for line in result.stderr.splitlines() if "training the hypernetwork" in line]
    assert said in report and len(progress) == 1 and said in progress[0]

    # The sentences follow from the numbers.
    assert summary["findings"] == findings(summary["rows"], summary["train_seconds"])
    for line in summary["findings"]:
        assert f"- {line}" in report
    # Redirected, the command prints the report's own lines: none cut at 80 columns, no emoji for the image.
    assert all(f"- {line}" in result.stdout.splitlines() for line in summary["findings"])
    assert "![residuals](residuals.png)" in result.stdout
    ht, lineas = rows["hypertransport"], rows["lineas"]
    pays = ht["residual_mean"] < 1 and ht["seconds_total"] < lineas["seconds_total"]
    assert ("paid back" in report) == pays and ("does not pay for itself" in report) == (not pays)

    with Image.open(out / "residuals.png") as plot:
        assert plot.size[0] >= 600
    assert (out / "sweep.png").stat().st_size > 0
    assert len(list((out / "baselines" / "lineas").glob("*.safetensors"))) == 2
    history = json.loads((out / "hyper" / "history.json").read_text())
    assert history[-1]["step"] == 10 and summary["hypernetwork"] == "trained here" and summary["train_steps"] == 10
    assert summary["config"]["train_steps"] == 10 and summary["config"]["retrain"]


def test_demo_compares_with_the_shipped_hypernetwork_by_default(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--test-concepts", "2", "--lineas-steps", "5"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    shipped = Predictor.load(shipped_checkpoint("tiny"), model="tiny")
    assert summary["hypernetwork"] == "shipped" and summary["checkpoint_sha256"] == shipped.digest
    assert summary["fit_concepts"] == shipped.checkpoint.info["train_concepts"]
    assert "retrain" in summary["config"] and not any(k.startswith("train_") for k in summary["config"])  # unused
    # Nothing was trained, and the held-out concepts are none of the shipped network's training concepts.
    assert not (out / "hyper").exists() and "training the hypernetwork" not in result.stderr
    assert not set(summary["test_concepts"]) & set(shipped.checkpoint.training_concepts.names)
    report = (out / "report.md").read_text()
    assert f"the shipped tiny hypernetwork, sha256 {shipped.digest[:12]}" in report
    assert "hypertransport" in _table(report)


def test_demo_sizes_are_checked_before_anything_runs(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--test-concepts", "0"])
    assert result.exit_code == 1
    assert "--test-concepts must be positive, got 0" in result.output
    assert not (tmp_path / "demo").exists()
