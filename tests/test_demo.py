"""`ht demo` end to end, in a reduced configuration (the full one is the README's main job)."""

import json

from typer.testing import CliRunner

from htcli.cli import app


def test_demo_reduced_runs_and_reports_honestly(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--train-concepts", "10", "--test-concepts", "2",
                                      "--train-steps", "10", "--lineas-steps", "5"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "random weights" in report and "activation space" in report
    for method in ("none", "mean-shift", "linear-act", "lineas", "hypertransport"):
        assert f"| {method} |" in report
    assert (out / "residuals.png").stat().st_size > 0 and (out / "sweep.png").stat().st_size > 0
    assert len(list((out / "baselines" / "lineas").glob("*.safetensors"))) == 2
    history = json.loads((out / "hyper" / "history.json").read_text())
    assert history[-1]["step"] == 10
