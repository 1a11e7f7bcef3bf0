"""The hypernetwork's training settings (`TrainConfig`), checked once, and what differs between a
saved run's settings and new ones (`ht train-hyper --resume`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from htcli.core.settings import plain, settings_differences
from htcli.errors import HTError
from htcli.methods.hypernetwork import HyperCheckpoint, HyperConfig, load_checkpoint


@dataclass
class TrainConfig:
    # What one step sees: K concepts x N samples, drawn from (a sample of) the training split.
    steps: int = 2000
    concepts_per_step: int = 8
    samples: int | None = None  # fitting samples per concept; None = all the dataset has
    limit_concepts: int | None = None  # train on a seeded subset of the training concepts (learning curves)
    extra_concepts: tuple[str, ...] = ()  # built concepts trained on besides the train split (never validated on)
    val_fraction: float = 0.1
    # AdamW with linear warm-up, cosine decay and gradient clipping.
    lr: float = 1e-4  # from the linear prior (docs/results.md); 1e-3 was best from the identity (--prior none)
    weight_decay: float = 0.01
    warmup: int = 100
    clip: float = 1.0
    # Precision and memory: the frozen model's dtype (htcli.core.precision: auto = bfloat16 on
    # CUDA, float32 on CPU); samples per backward pass (two-pass W2 gradient): None = what fits in
    # free memory, 0 = all K * N at once.
    dtype: str = "auto"
    micro_batch: int | None = None
    # Sparse group lasso on the predicted maps; evaluation interval; seed.
    l1: float = 0.0
    group: float = 0.0
    eval_every: int = 250
    seed: int = 0
    # Checkpoint averaging: the share of the last steps whose weights are averaged (0: off); the
    # checkpoint, and every evaluation once it starts, use the average.
    average: float = 0.0

    def __post_init__(self) -> None:
        for name in ("concepts_per_step", "eval_every", "limit_concepts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise HTError(f"{name}= must be positive, got {getattr(self, name)}")
        if self.steps < 0:
            raise HTError(f"steps= must be 0 (the network as it starts: its prior alone) or positive, got {self.steps}")
        if not self.lr > 0:
            raise HTError(f"lr= must be positive, got {self.lr}")
        if self.micro_batch is not None and self.micro_batch < 0:
            raise HTError(f"micro_batch= must be 0 (off) or positive, got {self.micro_batch}")
        if not 0 <= self.val_fraction < 1:
            raise HTError(f"val_fraction= must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.average < 1:
            raise HTError(f"average= must be in [0, 1), got {self.average}")


# --micro-batch changes only memory (the gradient is exact) and --dtype only rounding (a run
# may resume on another device), so a resumed run may change them.
RESUMABLE_CHANGES = {"micro_batch", "dtype"}
SHAPES = ("layers", "embed_dim")  # the dataset's, named together


def training_differences(saved_hyper: HyperConfig, saved_train: dict, hyper: HyperConfig, config: TrainConfig) -> list[str]:
    """Every architecture or training setting that differs (`settings_differences`: 'lr=0.005
    (saved 0.01)'); a setting the run did not save yet is taken as unchanged."""
    differ = []
    for saved, current in ((asdict(saved_hyper), asdict(hyper)), (saved_train, asdict(config))):
        saved = current | saved
        if any(plain(saved[key]) != plain(current[key]) for key in SHAPES if key in current):
            differ.append("the dataset's layers or concept encoder")
        current = {key: value for key, value in current.items() if key not in RESUMABLE_CHANGES | set(SHAPES)}
        differ += settings_differences(saved, current, _shown)
    return list(dict.fromkeys(differ))


def _shown(key: str, value) -> str:
    """A setting as its option takes it: rank 0 for dense heads, on/off for flags."""
    if key == "rank" and value is None:
        return "0"
    if isinstance(value, bool):
        return "on" if value else "off"
    return "all" if value is None else str(value)


def check_resumable(out: Path, hyper: HyperConfig, config: TrainConfig) -> HyperCheckpoint:
    """The checkpoint of the run in `out`, if `--resume` can continue it with these settings
    (`config.samples` resolved); else an HTError naming what is missing or what differs."""
    path = out / "hyper.safetensors"
    if not path.exists() or not (out / "optimizer.pt").exists():
        raise HTError(f"nothing to resume in {out}: no hyper.safetensors and optimizer.pt there")
    saved = load_checkpoint(path)
    differ = training_differences(saved.config, saved.info.get("config", {}), hyper, config)
    if differ:
        raise HTError(f"resume=True with other settings than the run in {out}: {', '.join(differ)}; "
                      "rerun with the saved values, or pass overwrite=True instead of resume=True to start afresh")
    return saved
