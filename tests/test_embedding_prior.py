"""What the hypernetwork reads of a concept (one embedding rule for training and prediction) and
what its maps start from (the prior), against independent computations."""

import json

import pytest
import torch
import torch.nn.functional as F

from htcli.data.concepts import load_library
from htcli.errors import HTError
from htcli.methods.embedding import EMBEDDING_PROMPTS, bare_text, concept_texts, embed_concepts
from htcli.methods.hypernetwork import HyperConfig, build_hypernetwork, init_prior
from htcli.models.encoders import get_encoder

LAYERS = (("a", 3), ("b", 5))


def test_embedding_rules_and_their_texts():
    art_deco = load_library().resolve("art deco")
    first, second = art_deco.templates
    assert concept_texts(art_deco, "phrase") == [art_deco.phrase]
    assert concept_texts(art_deco, "templates") == [art_deco.phrase, second.replace("{prompt}", "").format(
        concept=art_deco.name).strip(" ,")]
    # The prompts rule: the concept's templates in turn over the prompts, as its target samples are made.
    prompts = ["a red barn", "a cat", "a bridge"]
    assert concept_texts(art_deco, "prompts", prompts) == [first.format(prompt="a red barn", concept=art_deco.name),
                                                           second.format(prompt="a cat", concept=art_deco.name),
                                                           first.format(prompt="a bridge", concept=art_deco.name)]
    assert concept_texts("as a film noir still", "prompts", prompts)[1] == "a cat, as a film noir still"
    assert concept_texts("as a film noir still", "templates") == ["as a film noir still"]
    assert bare_text(art_deco) == art_deco.name and bare_text("zxqv") == "zxqv"
    encoder = get_encoder("minilm")
    by_hand = F.normalize(encoder.encode_text(concept_texts(art_deco, "prompts", prompts)).mean(0), dim=-1)
    torch.testing.assert_close(embed_concepts(encoder, [art_deco], "prompts", prompts)[0], by_hand)
    with pytest.raises(HTError, match="needs its neutral prompts"):
        embed_concepts(encoder, [art_deco], "prompts")
    with pytest.raises(HTError, match="unknown concept embedding"):
        HyperConfig(embed_dim=4, layers=LAYERS, embedding="bare")


def test_checkpoints_saved_before_the_settings_read_as_phrase_and_no_prior():
    config = HyperConfig(embed_dim=4, layers=LAYERS, embedding="prompts", embedding_prompts=("a cat",), prior="linear")
    assert HyperConfig.from_json(config.to_json()) == config
    old = {k: v for k, v in json.loads(config.to_json()).items() if k not in ("embedding", "embedding_prompts", "prior")}
    loaded = HyperConfig.from_json(json.dumps(old))
    assert (loaded.embedding, loaded.embedding_prompts, loaded.prior) == ("phrase", (), "none")
    # Only the prompts rule reads prompts; the default rule has its own.
    assert HyperConfig(embed_dim=4, layers=LAYERS, embedding="templates").embedding_prompts == ()
    assert HyperConfig(embed_dim=4, layers=LAYERS).embedding_prompts == EMBEDDING_PROMPTS
    with pytest.raises(HTError, match="unknown prior="):
        HyperConfig(embed_dim=4, layers=LAYERS, prior="ridge")


def _concepts(count=30, dim=6):
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(count, dim, generator=generator)  # (C, E)
    maps = torch.randn(count, 2 * 8, generator=generator) * 0.1  # (C, 2 * neurons)
    return embeddings, maps


def test_linear_prior_starts_at_the_ridge_regression():
    embeddings, maps = _concepts()
    config = HyperConfig(embed_dim=6, layers=LAYERS, hidden=8, rank=2, prior="linear")
    network = build_hypernetwork(config)
    init_prior(network, embeddings, maps, ridge=0.5)
    # The oracle: least squares on [X 1] stacked over sqrt(ridge) * [I 0] (the intercept unpenalised).
    x = F.normalize(embeddings, dim=-1)
    design = torch.cat([torch.cat([x, torch.ones(len(x), 1)], 1),
                        torch.cat([0.5 ** 0.5 * torch.eye(6), torch.zeros(6, 1)], 1)])
    solution = torch.linalg.lstsq(design.double(), torch.cat([maps, torch.zeros(6, 16)]).double()).solution.float()
    queries = torch.randn(4, 6)
    expected = torch.cat([F.normalize(queries, dim=-1), torch.ones(4, 1)], 1) @ solution  # (4, 16)
    out = network(queries)
    predicted = torch.cat([torch.cat([out[name][0] - 1, out[name][1]], 1) for name, _ in LAYERS], 1)
    torch.testing.assert_close(predicted, expected, atol=1e-5, rtol=1e-4)


def test_mean_prior_starts_every_concept_at_the_mean_map_and_none_at_the_identity():
    embeddings, maps = _concepts()
    for prior in ("mean", "none"):
        network = build_hypernetwork(HyperConfig(embed_dim=6, layers=LAYERS, hidden=8, rank=2, prior=prior))
        init_prior(network, embeddings, maps)
        out = network(torch.randn(3, 6))
        predicted = torch.cat([torch.cat([out[name][0] - 1, out[name][1]], 1) for name, _ in LAYERS], 1)
        expected = maps.mean(0) if prior == "mean" else torch.zeros(16)
        torch.testing.assert_close(predicted, expected.expand(3, -1))


def test_linear_prior_of_lower_rank_keeps_the_top_directions_of_the_fitted_maps():
    embeddings, maps = _concepts()
    full = build_hypernetwork(HyperConfig(embed_dim=6, layers=LAYERS, hidden=8, rank=2, prior="linear"))
    low = build_hypernetwork(HyperConfig(embed_dim=6, layers=LAYERS, hidden=8, rank=2, prior="linear", prior_rank=2))
    for network in (full, low):
        init_prior(network, embeddings, maps, ridge=0.5)
    flat = lambda out: torch.cat([torch.cat([out[n][0] - 1, out[n][1]], 1) for n, _ in LAYERS], 1)  # noqa: E731
    fitted = flat(full(embeddings))  # (C, O): the full ridge regression's fitted maps
    centred = fitted - fitted.mean(0)
    u, s, vh = torch.linalg.svd(centred, full_matrices=False)
    best_rank_2 = u[:, :2] @ torch.diag(s[:2]) @ vh[:2] + fitted.mean(0)  # Eckart-Young
    torch.testing.assert_close(flat(low(embeddings)), best_rank_2, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in low.linear.parameters()) == 6 * 2 + 2 * 16 + 16
