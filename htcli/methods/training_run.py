"""One `ht train-hyper` run: every check first, then the trainer under torchrun, then calibration.

Before the denoiser loads, the output folder, the calibration images (and an encoder that can
read them), the samples and the concepts are checked, and a `--resume` is compared with the
run it continues: any setting that would change the schedule or the model is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from htcli.core.files import check_output_dir
from htcli.core.runtime import Progress, is_main_process, process_group, resolve_device, world_size
from htcli.core.runtime import rank as process_rank
from htcli.data.dataset import ActivationDataset
from htcli.data.forward import Frozen
from htcli.errors import HTError
from htcli.methods.hypernetwork import HyperConfig, parameter_count
from htcli.methods.train_config import TrainConfig, check_resumable
from htcli.methods.training import Trainer, training_concepts


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    train_seconds: float
    final_loss: float | None
    train_residual: float | None  # a fixed sample of training concepts, on their evaluation samples
    val_residual: float | None  # None: no validation concepts
    test_residual: float | None  # None: the dataset has no held-out test concepts
    already_finished: bool = False  # --resume found the run finished: nothing was trained


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def train_hypernetwork(
    dataset: ActivationDataset,
    out: Path,
    config: TrainConfig,
    hyper: dict | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    grad_checkpointing: bool = False,
    model_path: str | None = None,
    calibration_images: Path | None = None,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
) -> TrainResult | None:
    """Train (or resume) a hypernetwork on `dataset` into `out`, under torchrun with DDP.

    `hyper` holds HyperConfig's architecture fields (arch, hidden, depth, rank). `model_path`:
    the local pipeline directory the model generates from (`load_denoiser`). With
    `calibration_images` (a folder), the encoder's modality gap is stored in the checkpoint.
    `progress(step, steps, text)` and `say(line)` are called on rank 0 only; returns the
    result there and None on the other ranks. Every check runs before the model loads; a
    `resume` of a finished run trains nothing (it still calibrates, given images).
    """
    # Every check before the model loads: the output folder, the calibration images and the
    # encoder they need, the samples, the concepts, and the run a --resume continues.
    out = check_output_dir(Path(out))
    if (out / "hyper.safetensors").exists() and not (resume or overwrite):
        raise HTError(f"{out} already holds a hypernetwork; pass resume=True to continue it or overwrite=True to replace it")
    images = None
    if calibration_images is not None:
        images = _calibration_paths(calibration_images)
        _check_image_encoder(dataset.settings.encoder)
    config = replace(config, samples=dataset.fitting_samples(config.samples))
    if config.extra_concepts:  # as the dataset names them; a test concept under any spelling is refused
        from htcli.data.concepts import load_library

        extra = load_library().extra_training(config.extra_concepts)
        config = replace(config, extra_concepts=tuple(dict.fromkeys(c.name for c in extra)))
    train_names, _ = training_concepts(dataset, config)
    spec = dataset.spec()
    embed_dim = int(dataset.embeddings(dataset.names()[:1]).shape[-1])
    hyper_config = HyperConfig(embed_dim=embed_dim, layers=tuple(dataset.layers.items()), **(hyper or {}))
    if resume:
        saved = check_resumable(out, hyper_config, config)
        if saved.info.get("step", 0) >= config.steps and "final_loss" in saved.info:
            return _finished(out, saved.info, images, train_names, say)

    torch_device = resolve_device(device)  # this rank's GPU under torchrun
    with process_group(torch_device) as distributed:
        rank, world = (process_rank(), world_size()) if distributed else (0, 1)
        main = rank == 0
        frozen = Frozen.load(spec, dataset.settings.layers, torch_device, config.dtype, grad_checkpointing, model_path)
        trainer = Trainer(frozen, dataset, hyper_config, config, out, spec.id, rank, world)
        if resume:
            trainer.resume()
        if main and say:
            start = f"resuming at step {trainer.step} of {config.steps}: " if trainer.step else ""
            say(f"{start}training {hyper_config.arch} hypernetwork ({parameter_count(hyper_config) / 1e6:.2f}M parameters, "
                f"{hyper_config.neurons:,} neurons) on {len(trainer.train)} concepts ({len(trainer.val)} validation, "
                f"{len(trainer.test)} held-out test), {world} process(es)")
        report = (lambda step, loss: progress(step, trainer.config.steps, f"loss {loss:.3g}")) if main and progress else None
        summary = trainer.fit(report)
        if main and images is not None:
            _calibrate(out, images, trainer.train)
    if not main:
        return None
    return TrainResult(out / "hyper.safetensors", trainer.step, summary["train_seconds"], summary["final_loss"],
                       summary["train_residual"], summary["val_residual"], summary["test_residual"])


def _finished(out: Path, info: dict, images: list[Path] | None, train_names: Sequence[str],
              say: Callable[[str], None] | None) -> TrainResult | None:
    """`--resume` of a run that already reached its last step: its saved result, nothing trained."""
    if not is_main_process():
        return None
    if say:
        say(f"the run in {out} is already finished ({info['step']} steps): nothing to train "
            "(pass overwrite=True instead of resume=True to train it afresh)")
    if images is not None:
        _calibrate(out, images, train_names)
    return TrainResult(out / "hyper.safetensors", info["step"], info.get("train_seconds", 0.0), info.get("final_loss"),
                       info.get("train_residual"), info.get("val_residual"), info.get("test_residual"),
                       already_finished=True)


def _calibrate(out: Path, images: list[Path], train_names: Sequence[str]) -> None:
    from htcli.core.files import load_rgb_images
    from htcli.data.concepts import load_library
    from htcli.methods.predict import calibrate_gap

    library = load_library()
    calibrate_gap(out / "hyper.safetensors", load_rgb_images(images, "calibration image"),
                  [library.resolve(name) for name in train_names])


def _check_image_encoder(encoder_id: str) -> None:
    """Calibration images need an encoder with an image tower; decided from the id (no weights
    load): `minilm` is text only, `open_clip:...` has both towers."""
    from htcli.models.encoders import MiniLMEncoder, OpenClipEncoder

    kind = MiniLMEncoder if encoder_id == "minilm" else OpenClipEncoder if encoder_id.startswith("open_clip:") else None
    if kind is None or not kind.has_images:
        raise HTError(f"calibration_images= needs a concept encoder with an image tower, and this dataset's encoder "
                      f"{encoder_id} has none: build the dataset with an open_clip encoder=, or leave the images out")


def _calibration_paths(folder: Path) -> list[Path]:
    """The images in `folder`, checked before training so a typo costs no training time."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HTError(f"calibration_images={str(folder)!r} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise HTError(f"no images (.png, .jpg, .webp) in {folder}")
    return paths
