"""Training the hypernetwork end to end with the W2 loss, over many concepts at once.

Each step draws K training concepts, predicts their maps from their embeddings, runs the N
cached source samples through the frozen denoiser once per concept (one batch of K * N, with
per-sample maps), and matches each concept's cached targets at every hooked layer. The
concepts a step draws depend only on (seed, step), so a resumed run repeats an uninterrupted
one exactly; under DDP each rank takes its share of the same draw.
"""

from __future__ import annotations

import contextlib
import csv
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from htcli.core.files import atomic_path, write_json
from htcli.core.transport import Maps
from htcli.data.dataset import ActivationDataset
from htcli.data.forward import Frozen
from htcli.errors import HTError
from htcli.methods.train_config import TrainConfig, check_resumable
from htcli.methods.baselines import fit_linear_act_maps
from htcli.methods.embedding import embed_concepts
from htcli.methods.hypernetwork import (
    HyperCheckpoint,
    HyperConfig,
    TrainingConcepts,
    build_hypernetwork,
    flat_maps,
    init_prior,
    load_checkpoint,
    ood_threshold,
    unbatch,
)
from htcli.methods.objective import residuals, w2_backward
from htcli.methods.ood import OODCalibration
from htcli.models.encoders import get_encoder


def split_train_val(names: Sequence[str], fraction: float, seed: int, limit: int | None) -> tuple[list[str], list[str]]:
    """A validation subset of the training concepts, for choosing settings: the held-out test
    concepts are never used for that."""
    order = sorted(names, key=str.lower)
    random.Random(seed).shuffle(order)
    n_val = round(fraction * len(order))
    val, train = order[:n_val], order[n_val:]
    if limit is not None:
        train = train[:limit]
    if not train:
        raise HTError("no training concepts: build the dataset with --split train or all")
    return train, val


def training_concepts(dataset: ActivationDataset, config: TrainConfig) -> tuple[list[str], list[str]]:
    """(train, validation) concept names: the dataset's train split less a validation subset,
    plus `config.extra_concepts`, which must be built and must not be held-out test concepts."""
    train, val = split_train_val(dataset.names("train"), config.val_fraction, config.seed, config.limit_concepts)
    built = set(dataset.names())
    missing = [name for name in config.extra_concepts if name not in built]
    if missing:
        raise HTError(f"extra concepts not in {dataset.root}: {', '.join(map(repr, missing[:5]))}; build them with "
                      "`ht build-dataset --extra-concepts FILE` (same --out) first")
    held_out = [name for name in config.extra_concepts if dataset.split_of(name) == "test"]
    if held_out:
        raise HTError(f"extra concepts {', '.join(map(repr, held_out))} are held-out test concepts of {dataset.root}")
    return train + [name for name in config.extra_concepts if name not in train and name not in val], val


def concept_embeddings(dataset: ActivationDataset, encoder: Any, names: Sequence[str], hyper: HyperConfig) -> Tensor:
    """(K, E) embeddings of the dataset's concepts `names` by the hypernetwork's embedding rule
    (`htcli.methods.embedding`): `phrase` is what the dataset stores, computed when it was built."""
    if hyper.embedding == "phrase":
        return dataset.embeddings(names)
    from htcli.data.concepts import load_library

    library = load_library()
    return embed_concepts(encoder, [library.resolve(name) for name in names], hyper.embedding, hyper.embedding_prompts)


def closed_form_maps(dataset: ActivationDataset, names: Sequence[str], samples: int) -> Tensor:
    """(C, 2 * neurons): each concept's Linear-AcT maps on its first `samples` fitting samples,
    flattened as the hypernetwork's outputs are (each layer's omega - 1, then beta, in turn)."""
    source = {layer: acts[:samples] for layer, acts in dataset.source_activations("fit").items()}  # (N, D)
    rows = []
    for start in range(0, len(names), 256):  # bounded memory: 256 concepts' targets at a time
        targets = dataset.targets(names[start : start + 256], "fit")  # (K, N, D) per layer
        for i in range(next(iter(targets.values())).shape[0]):
            maps = fit_linear_act_maps(source, {layer: t[i, :samples] for layer, t in targets.items()})
            rows.append(flat_maps(maps, dataset.settings.layers))
    return torch.stack(rows)


def draw(names: Sequence[str], k: int, seed: int, step: int) -> list[str]:
    """The K concepts of one step: a function of (seed, step) only."""
    rng = random.Random(seed * 1_000_003 + step)
    return [names[i] for i in rng.sample(range(len(names)), k)] if k <= len(names) else rng.choices(list(names), k=k)


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    warmup = min(config.warmup, config.steps // 10)  # short runs still get most of their steps at full rate

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def sparsity_penalty(maps: Maps, l1: float, group: float) -> Tensor:
    """Sparse group lasso on predicted (omega - 1, beta), per concept, averaged over concepts."""
    total = torch.zeros(())
    for omega, beta in maps.values():
        v = torch.cat([omega - 1, beta], dim=-1)  # (K, 2D)
        if l1:
            total = total + l1 * v.abs().sum(-1).mean()
        if group:
            total = total + group * math.sqrt(omega.shape[-1]) * v.norm(dim=-1).mean()
    return total


HISTORY_FIELDS = ("step", "loss", "lr", "train_residual", "val_residual", "test_residual", "seconds")
TRAIN_PROBE = 32  # training concepts whose residual the history logs

class Trainer:
    def __init__(self, frozen: Frozen, dataset: ActivationDataset, hyper: HyperConfig, config: TrainConfig,
                 out: Path, model_id: str, rank: int = 0, world: int = 1) -> None:
        self.frozen, self.dataset, self.hyper_config, self.config = frozen, dataset, hyper, config
        self.out, self.model_id, self.rank, self.world = out, model_id, rank, world
        config = self.config = replace(config, samples=dataset.fitting_samples(config.samples))
        if config.concepts_per_step % world:
            raise HTError(f"--concepts-per-step {config.concepts_per_step} must divide over {world} processes")
        self.train, self.val = training_concepts(dataset, config)
        self.test = dataset.names("test")
        # A fixed sample of training concepts scored like the held-out ones (their evaluation
        # samples), so underfitting and the generalisation gap read side by side in the history.
        self.train_probe = sorted(random.Random(config.seed).sample(self.train, min(TRAIN_PROBE, len(self.train))))
        names = self.train + self.val + self.test
        self.encoder = get_encoder(dataset.settings.encoder, str(frozen.model.device))
        self.embeddings = dict(zip(names, concept_embeddings(dataset, self.encoder, names, hyper)))
        inputs = dataset.source_inputs("fit")
        self.inputs = inputs[: config.samples]
        self.eval_inputs = dataset.source_inputs("eval")
        self.source_eval = dataset.source_activations("eval")
        device = frozen.model.device
        torch.manual_seed(config.seed)
        network = build_hypernetwork(hyper)
        if hyper.prior != "none":
            init_prior(network, torch.stack([self.embeddings[name] for name in self.train]),
                       closed_form_maps(dataset, self.train, config.samples))
        self.network = network.to(device)
        self.ddp = None
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.network, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config))
        self.step = 0
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.ood: OODCalibration | None = None
        self.averaged: dict[str, Tensor] | None = None  # running mean of the weights (`config.average`)
        self.average_count = 0

    # --- one step --------------------------------------------------------------------

    def accumulate(self, names: Sequence[str]) -> Tensor:
        """Back-propagate the mean W2 loss over the concepts `names` and all hooked layers
        (+ sparsity) into the hypernetwork's gradients; returns the loss, detached."""
        device = self.frozen.model.device
        k, n = len(names), self.config.samples
        embedding = torch.stack([self.embeddings[name] for name in names]).to(device)
        network = self.ddp or self.network
        inputs = self.inputs.repeat(k)
        targets = self.dataset.targets(names, "fit")
        sorted_targets = {layer: torch.sort(t[:, :n].to(device), dim=1).values for layer, t in targets.items()}

        def per_sample(rows: slice) -> Maps:
            maps = network(embedding)  # {layer: ((K, D), (K, D))}
            return {layer: (o.repeat_interleave(n, 0)[rows], b.repeat_interleave(n, 0)[rows]) for layer, (o, b) in maps.items()}

        # No autocast: the hypernetwork, its maps and the loss stay float32 whatever dtype the
        # frozen denoiser computes in (htcli.core.precision).
        no_sync = self.ddp.no_sync if self.ddp is not None else None
        penalty = torch.zeros(())
        if self.config.l1 or self.config.group:  # its gradient joins the W2 gradient before DDP's all-reduce
            with no_sync() if no_sync else contextlib.nullcontext():
                penalty = sparsity_penalty(network(embedding), self.config.l1, self.config.group)
                penalty.backward()
        loss = w2_backward(self.frozen, inputs, per_sample, sorted_targets, k, self.config.micro_batch, no_sync)
        return loss + penalty.detach()

    def train_step(self) -> float:
        names = draw(self.train, self.config.concepts_per_step, self.config.seed, self.step)
        start = time.perf_counter()
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.accumulate(names[self.rank :: self.world])
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.config.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.config.average and self.step > self.config.steps * (1 - self.config.average):
            self.accumulate_average()
        self.train_seconds += time.perf_counter() - start
        value = loss.detach()
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(value)
            value /= self.world
        return value.item()

    @torch.no_grad()
    def accumulate_average(self) -> None:
        """Fold the current weights into their running mean over the averaged steps."""
        self.average_count += 1
        if self.averaged is None:
            self.averaged = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
            return
        for key, value in self.network.state_dict().items():
            self.averaged[key] += (value - self.averaged[key]) / self.average_count

    @contextlib.contextmanager
    def published_weights(self):
        """The weights the run's results are: the average once averaging has started, else the
        current ones (restored afterwards, so training goes on from its own weights)."""
        if self.averaged is None:
            yield
            return
        current = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        self.network.load_state_dict(self.averaged)
        try:
            yield
        finally:
            self.network.load_state_dict(current)

    # --- evaluation ------------------------------------------------------------------

    @torch.no_grad()
    def concept_residual(self, name: str) -> float:
        """Held-out residual ratio of one concept's predicted maps, on its evaluation samples."""
        self.network.eval()
        maps = unbatch(self.network(self.embeddings[name][None].to(self.frozen.model.device)))[0]
        target = {k: v[0] for k, v in self.dataset.targets([name], "eval").items()}
        return residuals(self.frozen, self.eval_inputs, self.source_eval, target, maps)[0]

    def evaluate(self, *splits: Sequence[str]) -> list[float | None]:
        """Mean held-out residual ratio of each list of concepts in `splits` (None: empty list).

        Under DDP every rank computes its share of all the concepts and one all-reduce gives
        every rank all the ratios, so no rank waits in a collective while another evaluates
        alone. Each slot is written by one rank and is zero on the others: the sum is exact,
        and the means equal a single process's.
        """
        names = [name for split in splits for name in split]
        ratios = torch.zeros(len(names), dtype=torch.float64, device=self.frozen.model.device)  # (concepts,)
        for i in range(self.rank, len(names), self.world):
            ratios[i] = self.concept_residual(names[i])
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(ratios)
        shared, means = ratios.tolist(), []
        for split in splits:
            part, shared = shared[: len(split)], shared[len(split) :]
            means.append(sum(part) / len(part) if part else None)
        return means

    # --- checkpoints -----------------------------------------------------------------

    def checkpoint(self, summary: dict | None = None) -> HyperCheckpoint:
        info = {
            "dataset": str(self.dataset.root),
            "dataset_digest": self.dataset.manifest["settings_digest"],
            "train_concepts": len(self.train),
            "val_concepts": self.val,
            "test_concepts": len(self.test),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "config": asdict(self.config),
            **(summary or {}),
        }
        if self.ood is None:  # weight-independent, like the threshold: calibrated once
            self.ood = OODCalibration.fit(self.encoder, self.train, self.val)
        return HyperCheckpoint(self.network, self.hyper_config, self.model_id, self.dataset.settings.encoder, None, info,
                               training_concepts=self.calibrated_concepts(), random_weights=self.frozen.spec.random_weights,
                               ood=self.ood)

    def calibrated_concepts(self) -> TrainingConcepts:
        """The training concepts' names and embeddings, with the nearest-concept threshold
        calibrated on the validation concepts (it depends on no weight: every checkpoint has it)."""
        train = torch.stack([self.embeddings[name] for name in self.train]).float()  # (C, E)
        val = torch.stack([self.embeddings[name] for name in self.val]).float() if self.val else train[:0]  # (V, E)
        return TrainingConcepts(list(self.train), train, ood_threshold(val, train))

    def save(self, summary: dict | None = None) -> None:
        if self.rank != 0:
            return
        with self.published_weights():
            self.checkpoint(summary).save(self.out / "hyper.safetensors")
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "history": self.history,
            "network": self.network.state_dict(),  # the weights training goes on from (the checkpoint's may be averaged)
            "averaged": self.averaged,
            "average_count": self.average_count,
        }
        with atomic_path(self.out / "optimizer.pt") as tmp:
            torch.save(state, tmp)
        write_json(self.out / "history.json", self.history)
        with atomic_path(self.out / "history.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*HISTORY_FIELDS])
            writer.writeheader()
            writer.writerows(self.history)

    def resume(self) -> None:
        """Continue from `out`: weights, optimizer, schedule, step and history. The run must
        have the saved run's settings: others would silently restart its schedule."""
        saved = check_resumable(self.out, self.hyper_config, self.config)
        state = torch.load(self.out / "optimizer.pt", map_location=self.frozen.model.device, weights_only=True)
        self.network.load_state_dict(state.get("network") or saved.network.state_dict())  # older runs: the checkpoint's
        self.averaged, self.average_count = state.get("averaged"), state.get("average_count", 0)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.train_seconds, self.history = state["step"], state["train_seconds"], state["history"]

    # --- the loop --------------------------------------------------------------------

    def record(self, loss: float | None) -> None:
        """Evaluate (every rank: its share, then all the means), log the history and checkpoint
        (rank 0 only: the others go on and wait for it in the next step's all-reduce)."""
        with self.published_weights():
            train, val, test = self.evaluate(self.train_probe, self.val, self.test)
        self.history.append({"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                             "train_residual": train, "val_residual": val, "test_residual": test,
                             "seconds": self.train_seconds})
        self.save()

    def fit(self, on_step: Callable[[int, float], None] | None = None) -> dict:
        config = self.config
        if config.steps == 0 and not self.history:  # the network as it starts (its prior) is the result
            self.record(None)
        while self.step < config.steps:
            loss = self.train_step()
            if on_step:
                on_step(self.step, loss)
            if self.step % config.eval_every == 0 or self.step == config.steps:
                self.record(loss)
        final = self.history[-1] if self.history else {}
        summary = {"final_loss": final.get("loss"), "train_residual": final.get("train_residual"),
                   "val_residual": final.get("val_residual"),
                   "test_residual": final.get("test_residual"), "train_seconds": self.train_seconds}
        self.save(summary)
        return summary
