"""`ht plan --measure`: capture, LinEAS and training steps measured in fresh processes, beside the estimates."""

import json

import pytest
from typer.testing import CliRunner

from htcli.cli import app
from htcli.errors import HTError
from htcli.methods.measure import MeasureRequest, measured_spec

runner = CliRunner()


def test_the_measured_spec_has_random_weights_at_the_resolution_asked():
    spec = measured_spec("pixart", 256)
    assert spec.random_weights and spec.id == "pixart" and spec.resolution == 256
    assert spec.call_kwargs["use_resolution_binning"] is False  # PixArt would otherwise generate at 1024 px
    assert measured_spec("tiny", None).id == "tiny" and not measured_spec("tiny", None).random_weights
    with pytest.raises(HTError, match="multiple of 64"):
        measured_spec("pixart", 100)
    with pytest.raises(HTError, match="samples= must be at least 2"):
        MeasureRequest("tiny", samples=1)


def test_plan_reports_the_resolution_asked():
    result = runner.invoke(app, ["plan", "--model", "pixart", "--resolution", "256", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["resolution"] == 256 and not plan["random_weights"] and "measured" not in plan
    assert {layer["tokens"] for layer in plan["layers"]} == {(256 // 16) ** 2}  # 32 x 32 latents in 2 x 2 patches


@pytest.mark.slow
def test_plan_measure_runs_each_phase_in_a_process_of_its_own():
    result = runner.invoke(app, ["plan", "--model", "tiny", "--measure", "--samples", "2", "--concepts-per-step", "2",
                                 "--micro-batch", "1", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)["measured"]
    phases = measured["phases"]
    assert [p["name"] for p in phases] == ["capture", "LinEAS step", "LinEAS step, grad checkpointing", "train step",
                                           "train step, grad checkpointing"]
    assert [(p["samples"], p["batch"]) for p in phases] == [(8, 4), (2, 1), (2, 1), (4, 1), (4, 1)]
    for phase in phases:
        assert phase["peak_bytes"] > phase["base_bytes"] > 0 and phase["estimate_bytes"] > 0
        assert phase["seconds"] > 0 and phase["seconds_per_sample"] == pytest.approx(phase["seconds"] / phase["samples"])
    # Each phase starts in a fresh process: what it holds before loading anything (its imports) is
    # below what capture held at its peak (one process would start every later phase from there).
    assert all(phase["base_bytes"] < phases[0]["peak_bytes"] for phase in phases[1:])
