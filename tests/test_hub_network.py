"""Hub failures, never the internet: an endpoint on a closed loopback port (no connection) and a
stub server on 127.0.0.1 answering 401, 403, 404, gated, a missing revision, 500, or too late.
Each failure is one line naming the repo, in bounded time; a repo in the Hub cache is read from
there, with one warning, when the Hub cannot be reached."""

import socket
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from huggingface_hub import constants
from typer.testing import CliRunner

import htcli as ht
from htcli.cli import app
from htcli.core.hub_access import HubCacheWarning, HubError
from htcli.models import get_model
from htcli.models.plan import make_plan

runner = CliRunner()
BOUND_S = 5.0  # every failure answers well within this (huggingface_hub's retries took 25-46 s)
SLOW_S = 3.0  # the stub's late answer; the Hub timeout is set to 1 s below
# repo name -> (status, X-Error-Code header) the stub answers for it
ANSWERS = {"unauthorized": (401, None), "forbidden": (403, None), "absent": (404, "RepoNotFound"),
           "gated": (403, "GatedRepo"), "broken": (500, None)}


class _Stub(BaseHTTPRequestHandler):
    authorizations: list[str | None] = []  # the Authorization header of each request, in order

    def _answer(self):
        self.authorizations.append(self.headers.get("Authorization"))
        path = self.path.split("?")[0]
        if "/slow" in path:
            time.sleep(SLOW_S)
        status, code = 404, "RevisionNotFound"  # me/styles/revision/nope
        for name, answer in ANSWERS.items():
            if f"/me/{name}" in path:
                status, code = answer
        body = b'{"error": "stub"}'
        try:
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (the timeout case)
            pass

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_hub(monkeypatch):
    """The Hub endpoint: a stub server on 127.0.0.1, online (HF_HUB_OFFLINE unset), a 1 s timeout."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    _online(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


def _online(monkeypatch, endpoint):
    """What HF_ENDPOINT=endpoint and no HF_HUB_OFFLINE set in huggingface_hub (read at its import)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)


@pytest.fixture
def closed_port(monkeypatch):
    """The Hub endpoint: a loopback port nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _online(monkeypatch, f"http://127.0.0.1:{port}")


def _maps():
    layers = make_plan(get_model("tiny")).layers[:2]
    return ht.Intervention({layer.name: (torch.ones(layer.width), torch.zeros(layer.width)) for layer in layers},
                           "tiny", "lineas", "art deco")


def _fails(reference, message, **kwargs):
    """Load `reference`: one HubError line matching `message`, within BOUND_S; returns the seconds."""
    start = time.perf_counter()
    with pytest.raises(HubError, match=message) as raised:
        ht.Intervention.from_pretrained(reference, **kwargs)
    seconds = time.perf_counter() - start
    assert "\n" not in str(raised.value) and isinstance(raised.value, OSError) and seconds < BOUND_S, seconds
    return seconds


@pytest.mark.parametrize("repo,message", [
    ("me/unauthorized", r"Hub repo me/unauthorized was not found, or it is private and you are not logged in: "
                        r"check the repo id, or log in \(`hf auth login`, \$HF_TOKEN, or token=\)"),
    ("me/absent", "Hub repo me/absent was not found, or it is private"),
    ("me/forbidden", r"Hub repo me/forbidden: access denied \(403\); log in"),
    ("me/gated", r"Hub repo me/gated is gated: accept its conditions at http://127.0.0.1:\d+/me/gated and log in"),
    ("me/broken", r"could not reach the Hub at http://127.0.0.1:\d+ for Hub repo me/broken \(HTTP 500\), and it is "
                  r"not in the Hub cache: check the connection"),
    ("me/slow", r"could not reach the Hub .* for Hub repo me/slow \(ReadTimeout\)"),
    ("me/styles@nope", r"Hub repo me/styles at revision 'nope': the repo has no such revision"),
])
def test_each_hub_failure_is_one_line_in_bounded_time(hub_cache, stub_hub, repo, message):
    _fails(repo, message)
    cli = runner.invoke(app, ["inspect", repo])
    assert cli.exit_code == 1 and cli.output.count("\n") == 1 and repo.split("@")[0] in cli.output, cli.output


def test_no_connection_is_one_line_and_the_cache_is_used(hub_cache, closed_port, tmp_path):
    seconds = _fails("me/nothere", r"could not reach the Hub at http://127.0.0.1:\d+ for Hub repo me/nothere "
                                   r"\(ConnectError\), and it is not in the Hub cache")
    _fails("me/nothere", "Hub repo me/nothere at revision 'v2'", revision="v2")
    print(f"no connection: {seconds:.3f} s")

    hub_cache("me/styles", {"a.safetensors": _maps().save(tmp_path / "a.safetensors")})
    with pytest.warns(HubCacheWarning, match="could not reach the Hub .* for Hub repo me/styles .* using the files "
                                             "in the Hub cache") as caught:
        loaded = ht.Intervention.from_pretrained("me/styles")  # its one file, chosen from the cached snapshot
    assert len(caught) == 1 and loaded.concept == "art deco"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # local_files_only reads the cache without asking: no warning
        assert ht.Intervention.from_pretrained("me/styles", "a.safetensors", local_files_only=True).layers
    cli = runner.invoke(app, ["inspect", "me/styles/a.safetensors"])
    assert cli.exit_code == 0 and "art deco" in cli.output, cli.output


def test_the_token_and_revision_reach_the_hub(hub_cache, stub_hub):
    _Stub.authorizations.clear()
    _fails("me/unauthorized", "Hub repo me/unauthorized at revision 'v1' was not found", token="hf_test", revision="v1")
    assert _Stub.authorizations == ["Bearer hf_test"]


def test_a_server_error_falls_back_to_the_cache(hub_cache, stub_hub, tmp_path):
    hub_cache("me/broken", {"model.safetensors": _maps().save(tmp_path / "a.safetensors")})
    with pytest.warns(HubCacheWarning, match=r"for Hub repo me/broken \(HfHubHTTPError\)"):
        assert ht.Intervention.from_pretrained("me/broken").model == "tiny"


@pytest.mark.slow
def test_the_command_line_reads_hf_endpoint_and_warns_in_one_line(hub_cache, tmp_path):
    """`ht` in its own process, HF_ENDPOINT on a closed port and HF_HUB_OFFLINE unset: a cached repo
    is read with a one-line warning, a repo not in the cache is a one-line error."""
    import os
    import subprocess
    import sys

    hub_cache("me/styles", {"a.safetensors": _maps().save(tmp_path / "a.safetensors")})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    run = lambda reference: subprocess.run([sys.executable, "-m", "htcli", "inspect", reference], env=env,  # noqa: E731
                                           capture_output=True, text=True, timeout=120)
    cached = run("me/styles")
    assert cached.returncode == 0 and "art deco" in cached.stdout, cached.stderr
    warned = [line for line in cached.stderr.splitlines() if "Hub" in line]
    assert warned == [f"warning: could not reach the Hub at http://127.0.0.1:{port} for Hub repo me/styles "
                      "(ConnectError); using the files in the Hub cache"], cached.stderr
    missing = run("me/nothere")
    assert missing.returncode == 1 and missing.stderr.splitlines()[-1].startswith(
        f"Error: could not reach the Hub at http://127.0.0.1:{port} for Hub repo me/nothere (ConnectError)")
