"""`ht serve`: the model, hypernetwork and encoder loaded once, behind an HTTP API and a web page."""

from __future__ import annotations

from typing import Annotated

import typer

from htcli.cli.app import app
from htcli.cli.options import DeviceOption, HyperOption, ModelOption, ModelPathOption, RandomWeightsOption
from htcli.cli.output import console, warn
from htcli.errors import HTError
from htcli.models import get_model
from htcli.serve.service import Limits

DEFAULTS = Limits()
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::")


@app.command("serve")
def serve_command(
    model: ModelOption = None,
    hyper: HyperOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback exposes the server, "
                                      "which has no authentication, to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    batch_window_ms: Annotated[
        float, typer.Option(help="How long the first waiting image waits for others to share its pipeline call (ms).")
    ] = DEFAULTS.batch_window_ms,
    max_batch: Annotated[int, typer.Option(help="Images per pipeline call, from any requests (1: no batching).")]
    = DEFAULTS.max_batch,
    max_queue: Annotated[int, typer.Option(help="Requests in progress at once; more are answered 429.")]
    = DEFAULTS.max_queue,
    max_images: Annotated[int, typer.Option(help="Images per request (num_images x strengths).")] = DEFAULTS.max_images,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, uploads included (MiB).")]
    = DEFAULTS.max_body_bytes / 2**20,
    max_image_pixels: Annotated[int, typer.Option(help="Largest uploaded reference image (width x height).")]
    = DEFAULTS.max_image_pixels,
    max_request_pixels: Annotated[int, typer.Option(help="Largest total of one request's reference images (pixels).")]
    = DEFAULTS.max_request_pixels,
    max_strength: Annotated[float, typer.Option(help="Largest |strength| a request may ask for.")] = DEFAULTS.max_strength,
    cache_size: Annotated[int, typer.Option(help="Concepts whose predicted maps are kept (LRU; 0: none).")]
    = DEFAULTS.cache_size,
    cache_mb: Annotated[float, typer.Option(help="And at most this much memory of them (MiB).")]
    = DEFAULTS.cache_bytes / 2**20,
    max_refine: Annotated[int, typer.Option(help="Most LinEAS steps a request may refine with: its `refine` "
                                            "field x its concepts (targets are captured per concept and cached); one "
                                            "request refines at a time. It keeps a second copy of the denoiser for "
                                            "fitting. 0: off.")] = DEFAULTS.max_refine,
    max_connections: Annotated[int, typer.Option(help="Client connections open at once (also kept below the open-file "
                                                 "limit); at the cap, the oldest one still silent is closed.")]
    = DEFAULTS.max_connections,
    header_timeout_s: Annotated[float, typer.Option(help="Seconds a connection has to send its request's headers; "
                                                    "then 408 and closed.")] = DEFAULTS.header_timeout_s,
    body_timeout_s: Annotated[float, typer.Option(help="Seconds a request's whole body has to arrive; then 408.")]
    = DEFAULTS.body_timeout_s,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option("--allowed-host", help="A Host name the server answers to besides 127.0.0.1, localhost and [::1] "
                     "(the name clients or your proxy use); repeatable. Requests naming other hosts get 400."),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(help="Serve with Ray Serve: this many replicas, each with its own pipeline and one GPU when CUDA "
                     "is there (needs the ray extra). Default: one process, no Ray."),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="With --replicas: the Ray cluster to join (ray start --head). Default: a local Ray.")
    ] = None,
    model_path: ModelPathOption = None,
    random_weights: RandomWeightsOption = False,
    device: DeviceOption = None,
) -> None:
    """Serve steered generation over HTTP: POST /v1/generate, POST /v1/intervention, GET /v1/concepts,
    GET /v1/health, and a web page at /. Concepts are chosen per request; requests arriving
    within --batch-window-ms run as one batch with per-sample maps. Needs the serve extra:
    pip install -e ".[serve]". API and limits: docs/serve.md.

    Example: ht serve --model tiny --port 8000
    """
    if not 0 <= port <= 65535:
        raise HTError(f"--port must be from 0 to 65535 (0: any free port), got {port}")
    try:
        from htcli.serve.model_process import serve
    except ImportError as error:  # fastapi or uvicorn missing: one line, with the fix
        raise HTError(f"{error.name or error} is not installed; run: pip install -e \".[serve]\"") from None
    limits = Limits(max_batch=max_batch, batch_window_ms=batch_window_ms, max_queue=max_queue, max_images=max_images,
                    max_body_bytes=int(max_body_mb * 2**20), max_image_pixels=max_image_pixels,
                    max_request_pixels=max_request_pixels, max_strength=max_strength, cache_size=cache_size,
                    cache_bytes=int(cache_mb * 2**20), max_refine=max_refine, max_connections=max_connections,
                    header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s)
    allowed = [*(allowed_host or []), *([host] if host not in LOOPBACK + WILDCARDS else [])]
    if host not in LOOPBACK:
        warn(f"listening on {host}: anyone who can reach this address can use the server (it has no authentication)")
        if host in WILDCARDS and not allowed_host:
            warn("clients must name the server as 127.0.0.1 or localhost; add the names they use with --allowed-host")
    spec = get_model(model)
    if replicas is not None:
        serve_on_ray(spec.id, hyper, model_path, device, limits, allowed, replicas, host, port, ray_address)
        return

    def ready(url: str, health: dict) -> None:
        console.print(f"serving {health['model']} (hypernetwork {health['hypernetwork_sha256']}, {health['device']}) "
                      f"at {url}/ ; API: {url}/v1/health", highlight=False, markup=False)

    serve(dict(model=spec.id, hyper=hyper, model_path=model_path, device=device), limits, host, port, allowed,
          on_loading=lambda: console.print(f"loading {spec.id}...", highlight=False, markup=False), on_ready=ready)


def serve_on_ray(model: str, hyper, model_path, device, limits: Limits, allowed: list[str], replicas: int, host: str,
                 port: int, address: str | None) -> None:
    """`ht serve --replicas N`: the app on Ray Serve (htcli.serve.replicas)."""
    try:
        from htcli.serve.replicas import check_replicas, replica_options, serve_replicas
    except ImportError as error:
        raise HTError(f"{error.name or error} is not installed; --replicas needs: pip install -e \".[ray]\"") from None
    check_replicas(replicas)
    if port == 0:
        raise HTError("--replicas needs a fixed --port (Ray's proxy does not pick one)")
    console.print(f"starting Ray Serve: {replicas} replica(s) of {model}...", highlight=False, markup=False)
    options = replica_options(model, hyper, model_path, device, limits, allowed)
    serve_replicas(options, replicas, host, port, address=address,
                   on_ready=lambda url: console.print(f"serving {model} on {replicas} replica(s) at {url}/ ; "
                                                      f"API: {url}/v1/health", highlight=False, markup=False))
