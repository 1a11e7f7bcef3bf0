"""`ht evaluate` and `ht score`: evaluation runs, the CLIP, VLM and transport judges, reports.

Everything runs offline on the tiny world (random PixArt, random tiny open_clip): the images
are noise, so these tests check the pipeline and the arithmetic, never whether steering works.
"""

import base64
import hashlib
import io
import json
import math
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

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
from htcli.methods.encoders import get_encoder
from htcli.methods.hypernetwork import HyperCheckpoint, HyperConfig, build_hypernetwork
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
             "hyper": _checkpoint(root / "hyper"), "run": root / "runs" / "tiny" / "eval" / "first"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HT_RUNS", str(paths["runs"]))
        mp.setattr(htcli.models, "load_pipeline", lambda *a, **k: tiny[1])  # reuse the session's pipeline
        _invoke("build-dataset", "-m", "tiny", "-c", CONCEPT, "--samples-per-concept", 4, "--eval-samples", 4,
                "--out", paths["data"])
        _invoke("fit-linear-baselines", "--method", "mean-shift", "--data", paths["data"], "--split", "all",
                "--out", paths["baselines"])
        paths["evaluate"] = _invoke("evaluate", "-m", "tiny", "-c", CONCEPT, "--prompts", 1, "--seeds", 2,
                                    "--strength", "0,0.5,1", "--hyper", paths["hyper"], "--baselines", paths["baselines"],
                                    "--out", paths["run"])
    return paths


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# --- CLIP judge math ---------------------------------------------------------------------


def test_clip_math_on_tiny_open_clip():
    encoder = get_encoder("open_clip:ht-tiny-clip")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    x = encoder.encode_images([image])  # (1, 32)
    neutral = encoder.encode_text(["something"])
    scale = float(encoder.model.logit_scale.detach().exp())
    assert float(cosine(x, x)) == pytest.approx(1.0, abs=1e-6)
    # Identical image and concept embeddings: softmax of (s * 1, s * cos(x, neutral)).
    expected = 1 / (1 + math.exp(-scale * (1 - float(cosine(x, neutral)))))
    assert float(zero_shot(x, x, neutral, scale)) == pytest.approx(expected, rel=1e-5)
    assert float(zero_shot(x, neutral, neutral, scale)) == pytest.approx(0.5)  # concept = neutral: no information


def test_bootstrap_intervals_contain_the_mean_and_are_seeded():
    values = list(np.random.default_rng(1).normal(0.3, 0.1, 25))
    ci = bootstrap_ci(values)
    assert ci["lo"] < ci["mean"] < ci["hi"] and ci["mean"] == pytest.approx(np.mean(values))
    assert bootstrap_ci(values) == ci and bootstrap_ci(values, seed=1) != ci
    assert bootstrap_ci([0.7]) == {"mean": 0.7, "lo": 0.7, "hi": 0.7}
    assert bootstrap_ci([])["mean"] is None


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
    assert "0 image(s) generated (12 already there)" in _invoke(*args, "--seeds", 2).output
    monkeypatch.setattr(htcli.models, "load_pipeline", lambda *a, **k: tiny[1])
    # One more seed, for one method: only its image and the new unsteered one are made.
    assert "2 image(s) generated (12 already there)" in _invoke(*args, "--seeds", 3, "--methods", "prompt").output
    assert len(EvalRun.open(run).records) == 14
    # Images of other weights for the same method must not mix into the run.
    other = _checkpoint(tmp_path / "other", seed=1)
    result = runner.invoke(app, [str(a) for a in args] + ["--seeds", "3", "--hyper", str(other)])
    assert result.exit_code == 1 and "made with other weights" in result.output


# --- CLIP judge end to end ---------------------------------------------------------------


def test_score_clip_on_the_latest_run_writes_the_report(world, monkeypatch):
    monkeypatch.setenv("HT_RUNS", str(world["runs"]))
    result = _invoke("score", "--judge", "clip", "--model", "tiny", "--clip-model", "ht-tiny-clip")
    assert "most recent evaluation run of tiny" in result.output and "CLIP judge" in result.output
    scores = json.loads((world["run"] / "scores.json").read_text())
    clip = scores["clip"]
    assert clip["clip_model"] == "open_clip:ht-tiny-clip" and len(clip["images"]) == 12
    for row in clip["images"]:
        assert -1 <= row["concept_fidelity"] <= 1 and 0 < row["zero_shot"] < 1
        if row["method"] == "none":
            assert row["preservation"] == pytest.approx(1.0, abs=1e-5)  # the strength-0 image is its own reference
    for row in clip["summary"] + clip["by_concept"]:
        for metric in ("concept_fidelity", "zero_shot", "input_fidelity", "preservation"):
            assert row[metric]["lo"] - 1e-9 <= row[metric]["mean"] <= row[metric]["hi"] + 1e-9
    assert [(r["method"], r["strength"]) for r in clip["summary"]][:2] == [("none", 0.0), ("prompt", None)]
    report = (world["run"] / "report.md").read_text()
    assert "## CLIP judge" in report and "| hypertransport | 1 |" in report and "random weights" in report
    with Image.open(world["run"] / "clip_tradeoff.png") as plot:
        assert plot.size[0] > 300


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

    def do_POST(self):  # noqa: N802  (http.server's naming)
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
    result = _invoke("score", "--judge", "transport", "--data", world["data"], "--hyper", world["hyper"],
                     "--baselines", world["baselines"], "--run", world["run"])
    assert "Transport judge" in result.output
    transport = json.loads((world["run"] / "scores.json").read_text())["transport"]
    rows = {row["method"]: row for row in transport["rows"]}
    assert transport["concepts"] == [CONCEPT] and set(rows) == {"none", "mean-shift", "hypertransport"}
    assert rows["none"]["residual"]["mean"] == 1.0 and rows["mean-shift"]["residual"]["mean"] < 1.0
    assert "## Transport judge" in (world["run"] / "report.md").read_text()


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
        (["score", "--judge", "rouge", "--run", "{run}"], "unknown --judge"),
        (["score", "--judge", "clip", "--run", "{empty}"], "holds no images"),
        (["score", "--judge", "vlm", "--run", "{run}", "--pair", "hypertransport"], "--pair takes two"),
        (["score", "--judge", "vlm", "--run", "{run}", "--pair", "hypertransport,lineas", "--endpoint", "{url}"],
         "'lineas' is not in the run"),
        (["score", "--judge", "vlm", "--run", "{run}", "--endpoint", "{url}", "--timeout", "5"], "cannot reach the VLM endpoint"),
        (["evaluate", "-m", "tiny", "-c", CONCEPT, "--methods", "prompt,magic"], "unknown method 'magic'"),
        (["evaluate", "-m", "tiny", "-c", CONCEPT, "--prompts", "0"], "--prompts must be"),
        (["evaluate", "-m", "tiny", "-c", CONCEPT, "--strength", "lots"], "--strength takes numbers"),
        (["evaluate", "-m", "tiny", "-c", CONCEPT], "no hypernetwork at"),
        (["evaluate", "-m", "tiny", "-c", CONCEPT, "--methods", "prompt", "--out", "{run}", "--resume"], "not both"),
    ],
)
def test_bad_input_is_one_line_error(world, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HT_RUNS", str(tmp_path / "runs"))
    empty = tmp_path / "empty"
    EvalRun.open_or_create(empty, "tiny").save()
    assert (empty / INDEX).is_file()
    values = {"missing": tmp_path / "nowhere", "run": world["run"], "empty": empty,
              "url": f"http://127.0.0.1:{_closed_port()}/v1"}
    result = runner.invoke(app, [a.format(**values) for a in args])
    assert result.exit_code == 1, result.output
    assert message in result.output and result.output.count("Error:") == 1
