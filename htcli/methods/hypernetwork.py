"""The HyperTransport hypernetwork: concept embedding -> per-layer affine maps, in one pass.

`h(e) -> {(omega_l, beta_l)}_l` with e the L2-normalised concept embedding. The default (and
so far only) architecture is an MLP trunk (Linear, LayerNorm, GELU) with a low-rank output
head: a shared trunk state of width H is mapped to a rank-r code per layer, then to the
layer's 2 * D_l outputs (omega - 1, beta). Dense heads from H to every neuron would cost
H * 2 * sum(D_l) parameters (66M for PixArt at H = 512); the low-rank head costs
L * H * r + r * 2 * sum(D_l). The last projection starts at zero, so the untrained network
outputs the identity map for every concept, unless it starts from a prior (`PRIORS`,
`init_prior`): the mean of the training concepts' closed-form maps, or a ridge regression of
them on the embedding, as a linear path beside the MLP.

Architectures register in `ARCHITECTURES`; a checkpoint stores its `HyperConfig` as JSON, and
the training concepts' names and embeddings with a nearest-concept threshold
(`TrainingConcepts`), so every prediction can name its nearest training concepts, and the
out-of-distribution calibration of `htcli.methods.ood`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from htcli.core.files import read_tensors, save_tensors
from htcli.core.transport import Maps
from htcli.errors import HTError
from htcli.methods.embedding import EMBEDDING_PROMPTS, check_embedding
from htcli.methods.ood import OODCalibration
from htcli.models.interventions import fitted_timestep_metadata, read_fitted_timestep

FORMAT = "ht-hypernetwork/1"


@dataclass(frozen=True)
class HyperConfig:
    embed_dim: int
    layers: tuple[tuple[str, int], ...]  # (name, width) of every steered layer
    arch: str = "mlp"
    hidden: int = 512
    depth: int = 2
    rank: int | None = 64  # None: one dense head per layer
    embedding: str = "prompts"  # what is embedded of a concept (htcli.methods.embedding)
    embedding_prompts: tuple[str, ...] = EMBEDDING_PROMPTS  # the neutral prompts of the `prompts` embedding
    prior: str = "linear"  # what the maps start from before training: see PRIORS
    prior_rank: int = 128  # rank of the linear prior's path (at most the embedding's width)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise HTError(f"unknown hypernetwork architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}")
        if self.hidden < 1 or self.depth < 1 or (self.rank is not None and self.rank < 1):
            raise HTError("hidden=, depth= and rank= must be positive")
        if self.embedding != "prompts":  # only that rule reads prompts: others store none
            object.__setattr__(self, "embedding_prompts", ())
        check_embedding(self.embedding, self.embedding_prompts)
        if self.prior not in PRIORS:
            raise HTError(f"unknown prior= {self.prior!r}; use one of {', '.join(PRIORS)}")
        if self.prior_rank < 1:
            raise HTError("the linear prior's rank must be positive")

    @property
    def neurons(self) -> int:
        return sum(width for _, width in self.layers)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HyperConfig:
        # Checkpoints saved before these settings were trained with the phrase and no prior.
        data = {"embedding": "phrase", "embedding_prompts": (), "prior": "none"} | json.loads(text)
        data["layers"] = tuple((name, int(width)) for name, width in data["layers"])
        data["embedding_prompts"] = tuple(data["embedding_prompts"])
        return cls(**data)


class LowRankHead(nn.Module):
    """Trunk state (K, H) -> per-layer (K, 2 D_l), through a rank-r code per layer."""

    def __init__(self, hidden: int, widths: list[int], rank: int | None) -> None:
        super().__init__()
        self.widths = widths
        if rank is None:
            self.down = None
            self.up = nn.ModuleList(nn.Linear(hidden, 2 * w) for w in widths)
        else:
            self.down = nn.ModuleList(nn.Linear(hidden, rank) for _ in widths)
            self.up = nn.ModuleList(nn.Linear(rank, 2 * w) for w in widths)
        for up in self.up:  # identity at initialisation: omega - 1 = 0, beta = 0
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def forward(self, h: Tensor) -> list[Tensor]:
        if self.down is None:
            return [up(h) for up in self.up]
        return [up(down(h)) for down, up in zip(self.down, self.up)]


# What the predicted maps start from (before any W2 training step; set by `init_prior`):
# none: the identity map for every concept; mean: the mean of the training concepts' closed-form
# maps, for every concept (the head's bias); linear: a ridge regression of those maps on the
# concept embedding, a linear path of rank `prior_rank` beside the MLP (which starts at zero and
# learns the rest).
PRIORS = ("none", "mean", "linear")


class MLPHyper(nn.Module):
    """MLP trunk on the normalised embedding, low-rank per-layer heads (and, with the `linear`
    prior, a linear path from the embedding to every output)."""

    def __init__(self, config: HyperConfig) -> None:
        super().__init__()
        self.config = config
        blocks: list[nn.Module] = [nn.Linear(config.embed_dim, config.hidden)]
        for _ in range(config.depth - 1):
            blocks += [nn.LayerNorm(config.hidden), nn.GELU(), nn.Linear(config.hidden, config.hidden)]
        blocks += [nn.LayerNorm(config.hidden), nn.GELU()]
        self.trunk = nn.Sequential(*blocks)
        self.head = LowRankHead(config.hidden, [w for _, w in config.layers], config.rank)
        self.linear = None
        if config.prior == "linear":  # embedding -> rank-r code -> (omega - 1, beta) of each layer in turn
            rank = min(config.prior_rank, config.embed_dim)
            self.linear = nn.Sequential(nn.Linear(config.embed_dim, rank, bias=False), nn.Linear(rank, 2 * config.neurons))
            for part in self.linear.parameters():  # the identity until `init_prior`
                nn.init.zeros_(part)

    def forward(self, embedding: Tensor) -> Maps:
        """(K, E) embeddings -> {layer: (omega (K, D), beta (K, D))}."""
        e = F.normalize(embedding.float(), dim=-1)
        outputs = self.head(self.trunk(e))  # per layer (K, 2 D)
        if self.linear is not None:
            outputs = [out + part for out, part in zip(outputs, layer_parts(self.linear(e), self.config.layers))]
        maps = {}
        for (name, width), out in zip(self.config.layers, outputs):
            maps[name] = (1.0 + out[:, :width], out[:, width:])
        return maps


def layer_parts(flat: Tensor, layers: Sequence[tuple[str, int]]) -> tuple[Tensor, ...]:
    """(..., 2 * neurons) flat outputs -> each layer's (..., 2 D) part, (omega - 1, beta) in turn."""
    return flat.split([2 * width for _, width in layers], -1)


def flat_maps(maps: Maps, names: Iterable[str]) -> Tensor:
    """One concept's {layer: (omega (D,), beta (D,))} -> (2 * neurons,), as `layer_parts` reads it."""
    return torch.cat([torch.cat([maps[name][0] - 1, maps[name][1]]) for name in names])


PRIOR_RIDGE = 0.03  # ridge penalty of the linear prior, chosen on validation concepts (docs/results.md)


@torch.no_grad()
def init_prior(network: nn.Module, embeddings: Tensor, maps: Tensor, ridge: float = PRIOR_RIDGE) -> None:
    """Start `network` (untrained) from its config's prior, given the training concepts' (C, E)
    embeddings and their closed-form maps (C, 2 * neurons), each layer's (omega - 1, beta) in turn."""
    prior = network.config.prior
    if prior == "mean":
        for up, part in zip(network.head.up, layer_parts(maps.mean(0), network.config.layers)):
            up.bias.copy_(part)
    elif prior == "linear":  # ridge regression, reduced to the path's rank (the top directions of its fitted maps)
        x = F.normalize(embeddings.float(), dim=-1)  # (C, E), as the network sees them
        x_mean, y_mean = x.mean(0), maps.mean(0)
        xc = x - x_mean
        weight = torch.linalg.solve(xc.T @ xc + ridge * torch.eye(x.shape[1]), xc.T @ (maps - y_mean))  # (E, O)
        down, up = network.linear
        directions = torch.linalg.svd(xc @ weight, full_matrices=False).Vh[: down.out_features].T  # (O, <= r)
        directions = F.pad(directions, (0, down.out_features - directions.shape[1]))  # fewer concepts than r: zeros
        down.weight.copy_((weight @ directions).T)
        up.weight.copy_(directions)
        up.bias.copy_(y_mean - x_mean @ weight @ directions @ directions.T)


ARCHITECTURES: dict[str, type[nn.Module]] = {"mlp": MLPHyper}


def unbatch(maps: Maps) -> list[Maps]:
    """{layer: ((K, D), (K, D))} -> K per-concept maps {layer: ((D,), (D,))}."""
    count = next(iter(maps.values()))[0].shape[0]
    return [{layer: (o[i], b[i]) for layer, (o, b) in maps.items()} for i in range(count)]


def build_hypernetwork(config: HyperConfig) -> nn.Module:
    return ARCHITECTURES[config.arch](config)


def parameter_count(config: HyperConfig) -> int:
    """Parameters of the hypernetwork `config` describes, without building it."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_hypernetwork(config).parameters())


# A concept less similar to its nearest training concept than 95% of validation concepts are
# to theirs is out of distribution: its maps extrapolate beyond what training covered.
OOD_QUANTILE = 0.05


def nearest_similarities(queries: Tensor, references: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Cosine similarities (Q, k) of queries (Q, E) to their k nearest references (C, E), best
    first, and the references' indices (Q, k)."""
    queries = F.normalize(queries.float().to(references.device), dim=-1)
    similarity = queries @ F.normalize(references.float(), dim=-1).T  # (Q, C)
    return similarity.topk(min(k, references.shape[0]), dim=-1)


def ood_threshold(validation: Tensor, training: Tensor) -> float | None:
    """The similarity to the nearest training concept below which a concept is out of
    distribution: the OOD_QUANTILE quantile of the validation concepts' (V, E) similarities to
    their nearest training concept (C, E). None without validation concepts."""
    if validation.shape[0] == 0:
        return None
    best = nearest_similarities(validation, training, 1)[0][:, 0]  # (V,)
    return torch.quantile(best, OOD_QUANTILE).item()


@dataclass
class TrainingConcepts:
    """The concepts a hypernetwork was trained on, to name a prediction's nearest neighbours."""

    names: list[str]
    embeddings: Tensor  # (C, E): the concept embeddings the trainer used
    threshold: float | None = None  # see `ood_threshold`; None: trained without validation concepts

    def nearest(self, embeddings: Tensor, k: int = 3, against: Tensor | None = None) -> list[list[tuple[str, float]]]:
        """The k training concepts nearest to each (Q, E) embedding, best first: (name, cosine).
        `against`: other (C, E) embeddings of the same concepts (their bare names) to compare with."""
        values, indices = nearest_similarities(embeddings, self.embeddings if against is None else against, k)
        return [[(self.names[i], s) for i, s in zip(row_indices, row_values)]
                for row_indices, row_values in zip(indices.tolist(), values.tolist())]

    def is_ood(self, similarity: float) -> bool | None:
        """Whether a best similarity is out of distribution; None when there is no threshold."""
        return None if self.threshold is None else similarity < self.threshold


@dataclass
class HyperCheckpoint:
    """A trained hypernetwork and what it was trained for."""

    network: nn.Module
    config: HyperConfig
    model: str
    encoder: str
    gap: tuple[Tensor, Tensor] | None = None  # modality-gap means (image, text), for references
    info: dict = field(default_factory=dict)  # dataset digest, split, training summary
    fitted_timestep: int | None = None  # of its training maps; None: not known yet (`save` takes the model's) or older
    training_concepts: TrainingConcepts | None = None  # None: saved before ht stored them
    random_weights: bool = False  # trained on the model's architecture with random weights (`--random-weights`)
    ood: OODCalibration | None = None  # None: saved before ht stored it, or no validation concepts

    def save(self, path: Path) -> None:
        tensors = {f"net.{k}": v for k, v in self.network.state_dict().items()}
        if self.gap is not None:
            tensors["gap.image_mean"], tensors["gap.text_mean"] = self.gap
        concepts = {}
        if self.training_concepts is not None:
            tensors["concepts.embeddings"] = self.training_concepts.embeddings.float().contiguous()
            concepts = {"training_concepts": json.dumps(self.training_concepts.names),
                        "ood_threshold": json.dumps(self.training_concepts.threshold)}
        if self.ood is not None:
            tensors |= self.ood.tensors()
            concepts |= self.ood.metadata()
        metadata = {
            "format": FORMAT,
            "config": self.config.to_json(),
            "model": self.model,
            "encoder": self.encoder,
            "info": json.dumps(self.info),
            "random_weights": json.dumps(self.random_weights),
            **fitted_timestep_metadata(self.fitted_timestep, self.model),
            **concepts,
        }
        save_tensors(path, tensors, metadata)

    @torch.no_grad()
    def maps(self, embedding: Tensor) -> Maps:
        self.network.eval()
        return self.network(embedding)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> HyperCheckpoint:
    """Load a hypernetwork checkpoint strictly (missing or unexpected weights are an error)."""
    tensors, meta = read_tensors(Path(path), "hypernetwork checkpoint")
    if meta.get("format") != FORMAT:
        raise HTError(f"{path} is not an ht hypernetwork checkpoint (format {meta.get('format')!r})")
    config = HyperConfig.from_json(meta["config"])
    network = build_hypernetwork(config)
    state = {k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")}
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HTError(f"{path}: weights do not fit the stored config ({len(missing)} missing, {len(unexpected)} unexpected)")
    gap = (tensors["gap.image_mean"], tensors["gap.text_mean"]) if "gap.image_mean" in tensors else None
    info = json.loads(meta["info"])
    concepts = None
    if "concepts.embeddings" in tensors:
        concepts = TrainingConcepts(json.loads(meta["training_concepts"]), tensors["concepts.embeddings"],
                                    json.loads(meta["ood_threshold"]))
    return HyperCheckpoint(network.to(device).eval(), config, meta["model"], meta["encoder"], gap, info,
                           read_fitted_timestep(meta, path), concepts, json.loads(meta.get("random_weights", "false")),
                           OODCalibration.load(tensors, meta, path))
