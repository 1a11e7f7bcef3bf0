"""`ht evaluate` and `ht score`: evaluation runs, the CLIP, VLM and transport judges, reports.

Everything runs offline on the tiny world (random PixArt, random tiny open_clip): the images
are noise, so these tests check the pipeline and the arithmetic, never whether steering works.
"""

import base64
import hashlib
import io
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import htcli.models
from htcli.cli import app
from htcli.evaluation.clip import cosine, zero_shot
from htcli.evaluation.runs import INDEX, EvalRun
from htcli.evaluation.stats import bootstrap_ci
from htcli.evaluation.vlm import parse_verdict
from htcli.methods.hypernetwork import HyperCheckpoint, HyperConfig, build_hypernetwork
from htcli.models.encoders import get_encoder
from htcli.models.plan import make_plan

runner = CliRunner()
CONCEPT = "gouache"  # a held-out (test split) concept


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _checkpoint(folder, seed=0):
    """A hypernetwork for `tiny` with random (non-identity) heads, so steering changes images."""
    layers = tuple((layer.name, layer.width) for layer in make_plan(htcli.models.get_model("tiny")).layers)
    config = HyperConfig(embed_dim=384, layers=layers, hidden=16, rank=4)
    torch.manual_seed(seed)
    network = build_hypernetwork(config)
    for up in network.head.up:
        torch.nn.init.normal_(up.weight, std=0.3)
    folder.mkdir(parents=True, exist_ok=True)
    HyperCheckpoint(network, config, "tiny", "minilm").save(folder / "hyper.safetensors")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny):
    """A tiny dataset, a mean-shift baseline, a hypernetwork and an evaluation run made with them."""
    root = tmp_path_factory.mktemp("world")
    paths = {"root": root, "runs": root / "runs", "data": root / "data", "baselines": root / "baselines",
             "baselines2": root / "baselines2",
             "hyper": _checkpoint(root / "hyper"), "run": root / "runs" / "tiny" / "eval" / "first"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HT_RUNS", str(paths["runs"]))
        mp.setattr(htcli.models, "load_pipeline", lambda *a, **k: tiny[1])  # reuse the session's pipeline
        _invoke("build-dataset", "-m", "tiny", "-c", CONCEPT, "--samples", 4, "--eval-samples", 4,
                "--out", paths["data"])
        _invoke("fit-linear-baselines", "--method", "mean-shift", "--data", paths["data"], "--split", "all",
                "--out", paths["baselines"])
        _invoke("fit-linear-baselines", "--method", "linear-act", "--data", paths["data"], "--split", "all",
                "--out", paths["baselines2"])
        paths["evaluate"] = _invoke("evaluate", "-m", "tiny", "-c", CONCEPT, "--prompts", 1, "--seeds", 2,
                                    "--strength", "0,0.5,1", "--hyper", paths["hyper"], "--baselines", paths["baselines"],
                                    "--out", paths["run"])
    return paths


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# --- CLIP judge math ---------------------------------------------------------------------


def test_cosine_of_constructed_vectors():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    y = torch.tensor([[6.0, 8.0], [0.0, 5.0], [1.0, 0.0], [-1.0, 0.0]])
    # same direction (any length), orthogonal, 45 degrees, opposite
    assert cosine(x, y).tolist() == pytest.approx([1.0, 0.0, 1 / math.sqrt(2), -1.0], abs=1e-6)


def test_zero_shot_is_the_two_way_softmax_computed_by_hand():
    image, concept, neutral = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # cos(image, concept) = 0.6, cos(image, neutral) = 0.8; softmax(10 * [0.6, 0.8])[0] = 1 / (1 + e^2)
    assert float(zero_shot(image, concept, neutral, 10.0)) == pytest.approx(1 / (1 + math.exp(2.0)), rel=1e-6)
    assert float(zero_shot(image, neutral, concept, 10.0)) == pytest.approx(1 / (1 + math.exp(-2.0)), rel=1e-6)
    assert float(zero_shot(image, concept, concept, 100.0)) == pytest.approx(0.5)  # concept = neutral: no information


def test_bootstrap_interval_of_constant_data_is_a_point():
    assert bootstrap_ci([0.25] * 30) == {"mean": 0.25, "lo": 0.25, "hi": 0.25}
    assert bootstrap_ci([0.7]) == {"mean": 0.7, "lo": 0.7, "hi": 0.7}
    assert bootstrap_ci([None, 2.0, None, 4.0])["mean"] == 3.0  # missing values are left out
    assert bootstrap_ci([])["mean"] is None


def test_bootstrap_interval_covers_the_true_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 80, 320):
        values = rng.normal(0.3, 0.1, n)
        ci = bootstrap_ci(list(values))
        assert ci["mean"] == pytest.approx(values.mean())
        assert ci["lo"] < 0.3 < ci["hi"]  # the true mean, for this seed
        # the 95% percentile interval of a mean is about 2 x 1.96 standard errors wide
        assert ci["hi"] - ci["lo"] == pytest.approx(2 * 1.96 * values.std() / math.sqrt(n), rel=0.2)
        widths.append(ci["hi"] - ci["lo"])
    assert widths[0] > widths[1] > widths[2] and widths[0] > 2.5 * widths[2]  # 4x narrower for 16x the data, in theory
    values = list(rng.normal(0, 1, 25))
    assert bootstrap_ci(values) == bootstrap_ci(values) != bootstrap_ci(values, seed=1)  # seeded


def test_report_intervals_that_round_to_a_point_print_as_a_point():
    from htcli.evaluation.report import ci_text, pm_text

    for ci in ({"mean": 0.5, "lo": 0.5, "hi": 0.5}, {"mean": 0.5, "lo": 0.49996, "hi": 0.50004}):
        assert ci_text(ci) == pm_text(ci) == "0.500"  # report.md and the terminal agree
    assert ci_text({"mean": 0.5, "lo": 0.4, "hi": 0.61}) == "0.500 [0.400, 0.610]"
    assert ci_text({"mean": None}) == pm_text(None) == "-"


# --- the evaluation run ------------------------------------------------------------------


def test_evaluation_run_records_same_seeds_across_methods(world):
    run = EvalRun.open(world["run"])
    records = run.records
    # 1 concept x 1 prompt x 2 seeds: none, prompt, hypertransport and mean-shift at 0.5 and 1.
    assert len(records) == 2 * (1 + 1 + 2 + 2)
    assert {r["method"] for r in records} == {"none", "prompt", "hypertransport", "mean-shift"}
    assert len({r["seed"] for r in records}) == 2 and len({r["prompt"] for r in records}) == 1
    assert all((world["run"] / r["file"]).is_file() for r in records)
    none = [r for r in records if r["method"] == "none"]
    assert {r["strength"] for r in none} == {0.0}  # strength 0 is the unsteered image, made once
    prompt = next(r for r in records if r["method"] == "prompt")
    assert prompt["strength"] is None and prompt["text"] != prompt["prompt"] and CONCEPT in prompt["text"]
    steered = next(r for r in records if r["method"] == "hypertransport" and r["strength"] == 1.0)
    plain = next(r for r in none if r["seed"] == steered["seed"])
    assert not np.array_equal(_pixels(world["run"] / steered["file"]), _pixels(world["run"] / plain["file"]))
    assert len({r["weights"] for r in records if r["method"] == "hypertransport"}) == 1
    latest = json.loads((world["runs"] / "tiny" / "eval" / "latest.json").read_text())
    assert latest["run"] == str(world["run"].resolve())


def test_resume_skips_images_already_in_the_index(world, tmp_path, monkeypatch, tiny):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    monkeypatch.setenv("HT_RUNS", str(tmp_path / "runs"))
    args = ["evaluate", "-m", "tiny", "-c", CONCEPT, "--prompts", 1, "--strength", "0.5,1", "--hyper", world["hyper"],
            "--baselines", world["baselines"], "--out", run]

    def no_pipeline(*a, **k):
        raise AssertionError("nothing to generate: the pipeline must not load")

    monkeypatch.setattr(htcli.models, "load_pipeline", no_pipeline)
    assert "0 images generated (12 already there) for 1 concept x 1 prompt x 2 seeds" in _invoke(*args, "--seeds", 2).output
    # Without --concept, the baselines narrow the split: said as information, in plain English.
    everything = [a for a in args if a not in ("-c", CONCEPT)] + ["--seeds", 2, "--split", "all"]
    narrowed = _invoke(*everything).output
    assert "note: evaluating 1 concept that every baseline has fitted" in narrowed and "warning" not in narrowed
    monkeypatch.setattr(htcli.models, "load_pipeline", lambda *a, **k: tiny[1])
    # One more seed, for one method: only its image and the new unsteered one are made.
    assert "2 images generated (12 already there)" in _invoke(*args, "--seeds", 3, "--methods", "prompt").output
    assert len(EvalRun.open(run).records) == 14
    # Images of other weights for the same method must not mix into the run.
    other = _checkpoint(tmp_path / "other", seed=1)
    result = runner.invoke(app, [str(a) for a in args] + ["--seeds", "3", "--hyper", str(other)])
    assert result.exit_code == 1 and "made with other weights" in result.output


# --- CLIP judge end to end ---------------------------------------------------------------


def test_score_clip_on_the_latest_run_writes_the_report(world, monkeypatch, caplog):
    monkeypatch.setenv("HT_RUNS", str(world["runs"]))
    get_encoder.cache_clear()  # build the tiny CLIP here, to hear what its creation says
    handlers = list(logging.getLogger().handlers)
    # No --clip-model: the offline tiny model gets the shipped tiny CLIP, never a download.
    result = _invoke("score", "--judge", "clip", "--model", "tiny")
    assert "most recent evaluation run of tiny" in result.output and "CLIP judge" in result.output
    assert "No pretrained weights" not in caplog.text + result.output  # random on purpose: open_clip keeps quiet
    assert logging.getLogger().handlers == handlers and not logging.root.manager.disable  # and logging is as it was
    scores = json.loads((world["run"] / "scores.json").read_text())
    clip = scores["clip"]
    assert clip["clip_model"] == "open_clip:ht-tiny-clip" and len(clip["images"]) == 12
    # Per-image scores equal the cosines of independently computed embeddings.
    encoder = get_encoder("open_clip:ht-tiny-clip")
    rows, records = clip["images"], EvalRun.open(world["run"]).records
    assert [r["file"] for r in rows] == [r["file"] for r in records]
    images = encoder.encode_images([Image.open(world["run"] / r["file"]) for r in rows])  # (12, E)
    concept = encoder.encode_text([r["phrase"] for r in records])
    prompt = encoder.encode_text([r["prompt"] for r in rows])
    assert [r["concept_fidelity"] for r in rows] == pytest.approx(cosine(images, concept).tolist(), abs=1e-4)
    assert [r["input_fidelity"] for r in rows] == pytest.approx(cosine(images, prompt).tolist(), abs=1e-4)
    unsteered = {(r["prompt"], r["seed"]): i for i, r in enumerate(rows) if r["method"] == "none"}
    for i, row in enumerate(rows):
        ref = images[unsteered[(row["prompt"], row["seed"])]]
        assert row["preservation"] == pytest.approx(float(cosine(images[i], ref)), abs=1e-4)
    # Each summary row is the mean of its group's images.
    for summary in clip["summary"]:
        members = [r for r in rows if (r["method"], r["strength"]) == (summary["method"], summary["strength"])]
        assert summary["n"] == len(members) == 2
        assert summary["zero_shot"]["mean"] == pytest.approx(np.mean([r["zero_shot"] for r in members]), abs=1e-9)
    assert [(r["method"], r["strength"]) for r in clip["summary"]][:2] == [("none", 0.0), ("prompt", None)]
    report = (world["run"] / "report.md").read_text()
    assert "## CLIP judge" in report and "| hypertransport | 1 |" in report and "random weights" in report
    with Image.open(world["run"] / "clip_tradeoff.png") as plot:
        assert plot.size[0] > 600 and plot.size[1] > 400


def _isolate_from_the_hub(monkeypatch, offline: bool):
    """HF_HUB_OFFLINE set, or unset with the Hub endpoint on a closed local port (unreachable)."""
    import huggingface_hub.constants

    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
@pytest.mark.parametrize(
    "judge_args,what",
    [(["--judge", "clip", "--clip-model", "ViT-B-32", "--clip-pretrained", "laion2b_s34b_b79k"], "CLIP weights"),
     (["--judge", "vlm", "--backend", "transformers", "--vlm-model", "ht-test/not-cached-vlm"], "the VLM")],
    ids=["clip", "vlm"],
)
def test_uncached_judge_weights_fail_at_once_offline(world, monkeypatch, judge_args, what, offline):
    _isolate_from_the_hub(monkeypatch, offline)
    started = time.perf_counter()
    result = runner.invoke(app, ["score", "--run", str(world["run"]), *judge_args])
    assert result.exit_code == 1, result.output
    assert time.perf_counter() - started < 10
    assert f"Error: {what}" in result.output and "not in the local Hugging Face cache" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output  # one line: no retries, no warnings


# --- the run as a Hugging Face dataset ---------------------------------------------------


def test_run_loads_as_an_imagefolder_dataset(world, tmp_path):
    import datasets

    records = EvalRun.open(world["run"]).records
    lines = (world["run"] / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line)["file_name"] for line in lines] == [r["file"] for r in records]  # in sync with the index
    loaded = datasets.load_dataset("imagefolder", data_dir=str(world["run"]), split="train", cache_dir=str(tmp_path))
    columns = {"image", "prompt", "text", "concept", "category", "method", "strength", "seed", "weights"}
    assert set(loaded.column_names) == columns and len(loaded) == len(records)
    by_file = {r["file"]: r for r in records}
    for row in loaded.select(range(len(loaded))):
        record = by_file[Path(row["image"].filename).relative_to(world["run"]).as_posix()]
        assert {k: row[k] for k in columns - {"image"}} == {k: record[k] for k in columns - {"image"}}
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), _pixels(world["run"] / record["file"]))


# --- VLM judge: parsing, and the protocol against a loopback server ----------------------


@pytest.mark.parametrize(
    "answer,verdict",
    [("FIRST", "first"), ("second.", "second"), ("Answer: **Tie**", "tie"), ("Image 1", "first"), ("B", "second"),
     ("The first one, no, the second", None), ("banana", None), ("", None), (None, None)],
)
def test_parse_verdict(answer, verdict):
    assert parse_verdict(answer) == verdict


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI chat-completions endpoint on 127.0.0.1 that answers from `server.mode`."""

    def do_POST(self):
        server = self.server
        server.calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        urls = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
        server.seen.append((body["model"], [part["type"] for part in content], [u[:22] for u in urls]))
        first = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1]))).convert("RGB")
        a_first = hashlib.sha1(first.tobytes()).hexdigest() in server.a_images
        if server.calls > server.limit:  # bounded: a runaway client gets errors, not answers
            self.send_response(503)
            self.end_headers()
            return
        if server.mode == "prefers-a":  # a good judge, in varied formats, that always picks A
            answer = ("FIRST" if a_first else "Second.") if server.calls % 2 else ("Answer: **first**" if a_first else "2")
            reply = {"choices": [{"message": {"role": "assistant", "content": answer}}]}
        elif server.mode == "always-first":  # pure position bias
            reply = {"choices": [{"message": {"role": "assistant", "content": "First."}}]}
        else:  # malformed: words that are no verdict, and a reply without choices
            reply = {"choices": [{"message": {"content": "a nice picture"}}]} if server.calls % 2 else {"error": "?"}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server(world):
    """Protocol test double: a local OpenAI-compatible server on an ephemeral port, stopped after the test."""
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    server.calls, server.limit, server.seen, server.mode = 0, 64, [], "prefers-a"
    records = EvalRun.open(world["run"]).records
    server.a_images = {hashlib.sha1(Image.open(world["run"] / r["file"]).convert("RGB").tobytes()).hexdigest()
                       for r in records if r["method"] == "hypertransport"}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _vlm(world, server, *extra):
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    _invoke("score", "--judge", "vlm", "--run", world["run"], "--pair", "hypertransport,prompt", "--endpoint", url,
            "--vlm-model", "test-judge", "--timeout", 10, *extra)
    return json.loads((world["run"] / "scores.json").read_text())["vlm"]["hypertransport,prompt"]


def test_vlm_protocol_both_orders_and_malformed_answers(world, judge_server):
    # A judge that prefers A's image wherever it is shown: A wins every pair, in both orders.
    section = _vlm(world, judge_server)
    overall = section["summary"][-1]
    assert overall["strength"] == "all" and overall["judged"] == 4 and overall["malformed"] == 0
    assert overall["win"]["mean"] == 1.0 and overall["consistency"] == 1.0
    assert judge_server.calls == 8  # 2 strengths x 2 seeds, each asked twice
    model, parts, urls = judge_server.seen[0]
    assert model == "test-judge" and parts == ["text", "image_url", "image_url"]
    assert all(u == "data:image/png;base64," for u in urls)
    # Position bias alone cancels: always "first" gives ties, never wins.
    judge_server.mode = "always-first"
    overall = _vlm(world, judge_server)["summary"][-1]
    assert overall["tie"]["mean"] == 1.0 and overall["win"]["mean"] == 0.0 and overall["consistency"] == 0.0
    # Malformed answers are counted, not fatal.
    judge_server.mode = "malformed"
    section = _vlm(world, judge_server)
    assert section["malformed_answers"] == 8 and section["summary"][-1]["judged"] == 0
    report = (world["run"] / "report.md").read_text()
    assert "VLM judge: hypertransport vs prompt" in report and (world["run"] / "vlm_hypertransport_vs_prompt.png").is_file()


@pytest.mark.weights
def test_vlm_transformers_backend_real_model(world):
    from htcli.evaluation.vlm import TransformersBackend, vlm_judge

    records = EvalRun.open(world["run"]).records
    section = vlm_judge(records, "hypertransport", "prompt", TransformersBackend("HuggingFaceTB/SmolVLM-256M-Instruct"),
                        world["run"])
    assert section["summary"][-1]["items"] == 4


# --- transport judge ---------------------------------------------------------------------


def test_transport_judge_on_tiny(world):
    _invoke("score", "--judge", "clip", "--run", world["run"])  # another judge's section and plot in the run
    clip_plot = (world["run"] / "clip_tradeoff.png").stat().st_mtime_ns
    result = _invoke("score", "--judge", "transport", "--data", world["data"], "--hyper", world["hyper"],
                     "--baselines", world["baselines"], "--baselines", world["baselines2"] / "linear-act",
                     "--limit-concepts", 1, "--run", world["run"])
    assert "Transport judge: 1 held-out concept, W2" in result.output  # the title in one piece, in the singular
    # It lists (and writes) what it made, not the CLIP plot it left alone.
    report_line = next(line for line in result.stdout.splitlines() if line.startswith("report: "))
    assert [Path(p).name for p in report_line.removeprefix("report: ").split(", ")] == [
        "scores.json", "report.md", "transport_residuals.png"]
    assert (world["run"] / "clip_tradeoff.png").stat().st_mtime_ns == clip_plot
    assert "## CLIP judge" in (world["run"] / "report.md").read_text()  # the report still has every section
    transport = json.loads((world["run"] / "scores.json").read_text())["transport"]
    rows = {row["method"]: row for row in transport["rows"]}
    assert transport["concepts"] == [CONCEPT] and set(rows) == {"none", "mean-shift", "linear-act", "hypertransport"}
    assert rows["none"]["residual"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
    for method, folder in (("mean-shift", world["baselines"]), ("linear-act", world["baselines2"])):
        summary = json.loads((folder / method / "summary.json").read_text())  # the baselines' own numbers
        assert rows[method]["residual"]["mean"] == pytest.approx(summary["concepts"][CONCEPT]["residual"])
        assert rows[method]["residual"]["mean"] < 0.9  # a fitted map moves the source towards the target
    assert rows["hypertransport"]["residual"]["mean"] == pytest.approx(transport["per_concept"]["hypertransport"][CONCEPT])
    # The judge captures no targets: a baseline's time from the text is unknown here, and said so.
    assert rows["mean-shift"]["seconds_total"] is None and rows["mean-shift"]["times_ht"] is None
    assert rows["hypertransport"]["seconds_total"] == rows["hypertransport"]["seconds_median"]
    assert "## Transport judge" in (world["run"] / "report.md").read_text()
    assert "not measured by this judge" in (world["run"] / "report.md").read_text()
    assert (world["run"] / "transport_residuals.png").is_file()
    printed = runner.invoke(app, ["score", "--judge", "transport", "--data", str(world["data"]), "--hyper",
                                  str(world["hyper"]), "--baselines", str(world["baselines"]), "--run", str(world["run"]),
                                  "--json"])
    assert printed.exit_code == 0 and json.loads(printed.stdout)["concepts"] == [CONCEPT]


# --- bad input ---------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "args,message",
    [
        (["score", "--judge", "clip", "--run", "{missing}"], "is not an evaluation run"),
        (["score", "--judge", "clip", "--model", "tiny"], "no evaluation run of model 'tiny'"),
        (["score", "--judge", "clip", "--run", "{run}", "--clip-model", "nope"], "unknown open_clip architecture 'nope'"),
        (["score", "--judge", "clip", "--run", "{run}", "--clip-model", "ViT-B-3"], "for example ViT-B-32"),
        (["score", "--judge", "transport", "--data", "{data}", "--hyper", "{hyper}", "--limit-concepts", "0"],
         "--limit-concepts must be positive"),
        (["score", "--judge", "clip", "--run", "{empty}"], "holds no images"),
        (["score", "--judge", "vlm", "--run", "{run}", "--pair", "hypertransport"], "--pair takes two"),
        (["score", "--judge", "vlm", "--run", "{run}", "--pair", "hypertransport,lineas", "--endpoint", "{url}"],
         "'lineas' is not in the run"),
        (["score", "--judge", "vlm", "--run", "{run}", "--endpoint", "{url}", "--timeout", "5"], "cannot reach the VLM endpoint"),
        (["evaluate", "-m", "tiny", "-c", CONCEPT, "--methods", "prompt,magic"], "unknown method 'magic'"),
        (["evaluate", "-m", "tiny", "-c", CONCEPT, "--prompts", "0"], "--prompts must be"),
        (["evaluate", "-m", "tiny", "-c", CONCEPT, "--strength", "lots"], "--strength takes numbers"),
        (["evaluate", "-m", "tiny", "-c", CONCEPT, "--hyper", "{missing}"], "no hypernetwork at"),
        (["evaluate", "-m", "tiny", "-c", CONCEPT, "--methods", "prompt", "--out", "{run}", "--resume"], "not both"),
        (["evaluate", "-m", "tiny", "-c", CONCEPT, "--methods", "prompt", "--out", "{readme}"], "--out"),
        (["evaluate", "-m", "tiny", "-c", CONCEPT, "--methods", "prompt", "--out", "{foreign}"], "not an evaluation run"),
    ],
)
def test_bad_input_is_one_line_error(world, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HT_RUNS", str(tmp_path / "runs"))
    empty = tmp_path / "empty"
    EvalRun.open_or_create(empty, "tiny").save()
    assert (empty / INDEX).is_file()
    readme, foreign = tmp_path / "README.md", tmp_path / "foreign"
    readme.write_text("keep me")
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me too")
    values = {"missing": tmp_path / "nowhere", "run": world["run"], "empty": empty, "data": world["data"], "hyper": world["hyper"],
              "url": f"http://127.0.0.1:{_closed_port()}/v1", "readme": readme, "foreign": foreign}
    monkeypatch.setattr(htcli.models, "load_pipeline", lambda *a, **k: pytest.fail("the pipeline loaded before the check"))
    result = runner.invoke(app, [a.format(**values) for a in args])
    assert result.exit_code == 1, result.output
    assert message in result.output and result.output.count("Error:") == 1
    if "--clip-model" in args:  # not open_clip's list of every model
        assert len(result.output.strip().splitlines()) == 1 and len(result.output) < 300, result.output
    assert readme.read_text() == "keep me" and os.listdir(foreign) == ["notes.txt"]
