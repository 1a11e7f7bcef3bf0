"""Experiment: the hypernetwork's linear prior alone, per concept embedding, ridge penalty and rank.

Run: python -m bench.ridge --data runs/tiny/search-data --extra-concepts concepts/extra_training.txt \
         [--embeddings phrase,templates,prompts:8,prompts:16,prompts:32] [--ridges 0.01,0.03,0.1,0.3] [--ranks 128]
For each setting, the network `ht train-hyper --prior linear` starts from (a ridge regression of
the training concepts' Linear-AcT maps on their embeddings, reduced to the path's rank: no W2
step) is scored on the validation concepts and on a fixed sample of training concepts, as
`train-hyper` scores them (their evaluation samples). `prompts:K` embeds each concept in the
first K of the dataset's fitting prompts. Held-out test concepts take no part. Also prints the
per-concept closed forms (mean shift, Linear-AcT) and one mean map for every concept on the
same concepts, for reference. Seconds, not minutes, per setting: settings for the W2 runs of
`bench.search` are screened here. Last line: best=<setting> val_residual=<its validation residual>
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import quiet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("runs/tiny/data"))
    parser.add_argument("--extra-concepts", type=Path, help="as train-hyper's --extra-concepts")
    parser.add_argument("--embeddings", default="phrase,templates,prompts:8,prompts:16,prompts:32")
    parser.add_argument("--ridges", default="0.01,0.03,0.1,0.3")
    parser.add_argument("--ranks", default="128")
    args = parser.parse_args()
    quiet()
    import torch

    from htcli.data.concepts import load_library, read_concept_names
    from htcli.data.dataset import ActivationDataset
    from htcli.data.forward import Frozen
    from htcli.methods.baselines import fit_mean_shift_maps
    from htcli.methods.hypernetwork import HyperConfig, build_hypernetwork, init_prior
    from htcli.methods.objective import residuals
    from htcli.methods.train_config import TrainConfig
    from htcli.methods.training import Trainer, closed_form_maps

    data = ActivationDataset(args.data)
    extra = ()
    if args.extra_concepts:
        extra = tuple(dict.fromkeys(c.name for c in load_library().extra_training(read_concept_names(args.extra_concepts))))
    config = TrainConfig(steps=0, extra_concepts=extra, samples=data.fitting_samples())
    frozen = Frozen.load(data.spec(), data.settings.layers, "cpu")
    layers = tuple(data.layers.items())
    maps = None
    rows = []
    for setting in args.embeddings.split(","):
        rule, _, count = setting.partition(":")
        prompts = tuple(data.settings.fit_prompts[: int(count)]) if count else ()
        hyper = HyperConfig(embed_dim=int(data.embeddings(data.names()[:1]).shape[-1]), layers=layers, embedding=rule,
                            embedding_prompts=prompts, prior="linear")
        # Embeds every concept once; its network, and so its prior, is replaced below (fitted once per rank and ridge).
        trainer = Trainer(frozen, data, replace(hyper, prior="none"), config, Path("unused"), data.settings.model)
        if maps is None:  # the same targets for every setting
            maps = closed_form_maps(data, trainer.train, config.samples)
            reference(trainer, data, frozen, fit_mean_shift_maps, residuals, maps)
        embeddings = torch.stack([trainer.embeddings[name] for name in trainer.train])
        for rank in map(int, args.ranks.split(",")):
            trainer.network = build_hypernetwork(replace(hyper, prior_rank=rank))
            for ridge in map(float, args.ridges.split(",")):
                init_prior(trainer.network, embeddings, maps, ridge)
                train, val = trainer.evaluate(trainer.train_probe, trainer.val)
                rows.append((f"{setting} rank {rank} ridge {ridge:g}", train, val))
                print(f"| {rows[-1][0]} | {train:.3f} | {val:.3f} |", flush=True)
    best = min(rows, key=lambda row: row[2])
    print(f"best={best[0].replace(' ', '_')} val_residual={best[2]:.3f}")


def reference(trainer, data, frozen, fit_mean_shift_maps, residuals, maps) -> None:
    """Mean shift and Linear-AcT fitted on each validation concept, and the mean map of the
    training concepts' Linear-AcT maps for every concept: the scale the table reads against."""
    import torch

    from htcli.methods.baselines import fit_linear_act_maps
    from htcli.methods.hypernetwork import layer_parts

    source_fit = data.source_activations("fit")
    inputs, source = data.source_inputs("eval"), data.source_activations("eval")
    layers = list(data.layers.items())
    mean = {name: (1 + part[:width], part[width:]) for (name, width), part in zip(layers, layer_parts(maps.mean(0), layers))}
    for label, fit in (("mean shift", fit_mean_shift_maps), ("Linear-AcT", fit_linear_act_maps), ("one mean map", None)):
        ratios = []
        for name in trainer.val:
            target_fit = {k: v[0] for k, v in data.targets([name], "fit").items()}
            target = {k: v[0] for k, v in data.targets([name], "eval").items()}
            predicted = mean if fit is None else fit(source_fit, target_fit)
            with torch.no_grad():
                ratios.append(residuals(frozen, inputs, source, target, predicted)[0])
        print(f"| {label} (per validation concept) | - | {statistics.fmean(ratios):.3f} |", flush=True)


if __name__ == "__main__":
    main()
