"""Selection logic: each selector picks what it promises, modes, weighting, state and config."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from pydantic import ValidationError

from olm_cli.errors import CheckpointError
from olm_cli.samples import Block
from olm_cli.selectors import (
    SELECTORS,
    Selection,
    Selector,
    SelectorConfig,
    mean_token_entropy,
)
from olm_cli.selectors.choice import choose_indices, normalised_weights, seeded_generator
from olm_cli.selectors.coverage import apportion
from olm_cli.strategy import StrategyContext

V = 16
PAD = 0


class TableModel(torch.nn.Module):
    """Logits and last hidden state are a per-token table lookup: outputs fully controlled."""

    def __init__(self, logit_table: torch.Tensor, hidden_table: torch.Tensor) -> None:
        super().__init__()
        self.logit_table = torch.nn.Parameter(logit_table, requires_grad=False)
        self.hidden_table = torch.nn.Parameter(hidden_table, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        hidden = self.hidden_table[input_ids]
        return SimpleNamespace(logits=self.logit_table[input_ids], hidden_states=(hidden,))


def block(tokens: list[int]) -> Block:
    return Block(tokens=np.asarray(tokens, dtype=np.int32), shard="s", domain="d")


def confident_counter() -> TableModel:
    """Tokens 1-7 confidently predict "next token = this + 1"; tokens 8-15 predict uniformly."""
    logits = torch.zeros(V, V)
    for t in range(1, 8):
        logits[t, t + 1] = 12.0
    return TableModel(logits, torch.eye(V))


def clustered(centres: int, per_centre: int, noise: float = 0.05) -> TableModel:
    """Token ids 1..centres*per_centre; ids of one group embed near the same random centre."""
    gen = torch.Generator().manual_seed(0)
    dim = 8
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen))[0][:centres]
    hidden = torch.zeros(1 + centres * per_centre, dim)
    for c in range(centres):
        for j in range(per_centre):
            hidden[1 + c * per_centre + j] = basis[c] + noise * torch.randn(dim, generator=gen)
    return TableModel(torch.zeros(len(hidden), len(hidden)), hidden)


def cfg(**overrides: Any) -> SelectorConfig:
    return SelectorConfig(**overrides)


# -- scored selectors ---------------------------------------------------------------------------


def test_entropy_picks_uncertain_samples() -> None:
    model = confident_counter()
    confident = [block([1, 2, 3, 4]), block([2, 3, 4, 5]), block([3, 4, 5, 6]), block([1, 2])]
    uncertain = [block([9, 10, 11, 12]), block([12, 13, 14, 15])]
    pool = [confident[0], uncertain[0], confident[1], confident[2], uncertain[1], confident[3]]
    sel = SELECTORS.build(cfg(name="entropy", pool_factor=3), StrategyContext(seed=0)).select(model, pool, 2, PAD)
    assert sorted(sel.indices) == [1, 4]
    assert sel.unselected == 4
    assert sel.scores is not None and sel.scores.shape == (6,)
    assert sel.weights is None
    assert sel.stats["pool_mean_entropy"] == pytest.approx(float(sel.scores.mean()), rel=1e-6)
    assert sel.pool is not None and sel.pool.loss.shape == (6,)  # reusable, e.g. as priorities


def test_loss_picks_badly_predicted_samples() -> None:
    model = confident_counter()
    # All tokens confident, but only the counting samples follow the prediction.
    pool = [block([1, 2, 3, 4]), block([1, 5, 3, 7]), block([2, 3, 4, 5]), block([4, 2, 6, 1])]
    sel = SELECTORS.build(cfg(name="loss"), StrategyContext(seed=0)).select(model, pool, 2, PAD)
    assert sorted(sel.indices) == [1, 3]
    entropy = SELECTORS.build(cfg(name="entropy"), StrategyContext(seed=0)).select(model, pool, 4, PAD)
    assert entropy.scores is not None and np.ptp(entropy.scores) < 1e-3  # entropy can't tell


def test_gradnorm_picks_samples_with_large_gradients() -> None:
    model = confident_counter()
    pool = [block([1, 2, 3, 4]), block([1, 5, 3, 7]), block([9, 10, 11]), block([2, 3, 4, 5])]
    sel = SELECTORS.build(cfg(name="gradnorm"), StrategyContext(seed=0)).select(model, pool, 2, PAD)
    assert sorted(sel.indices) == [1, 2]  # surprising and uncertain, not the learnt counting


def test_real_llama_selection_ranks_by_the_reported_scores() -> None:
    model = tiny_llama(max_position_embeddings=64)
    rng = np.random.default_rng(0)
    pool = [block(rng.integers(1, 64, size=int(n)).tolist()) for n in rng.integers(3, 20, size=10)]
    for name in ("entropy", "loss", "gradnorm", "diversity", "coverage"):
        sel = SELECTORS.build(cfg(name=name, score_micro_batch=3), StrategyContext(seed=0)).select(
            model, pool, 4, PAD
        )
        assert len(sel.indices) == 4 and len(set(sel.indices)) == 4
        assert sel.unselected == 6
        assert sel.scores is not None and np.all(np.isfinite(sel.scores))
        if name in ("entropy", "loss", "gradnorm"):
            assert sorted(sel.indices) == sorted(np.argsort(-sel.scores)[:4].tolist())


def test_mean_token_entropy_is_uniform_maximum_and_ignores_padding() -> None:
    logits = torch.zeros(2, 4, 10)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    logits[1, 2:] = torch.randn(2, 10) * 50  # padded positions must not count
    np.testing.assert_allclose(mean_token_entropy(logits, mask).numpy(), np.log(10), rtol=1e-6)


# -- diversity and coverage ---------------------------------------------------------------------


def test_diversity_does_not_take_duplicates_while_new_points_remain() -> None:
    model = clustered(centres=4, per_centre=1, noise=0.0)
    pool = [block([1, 1]), block([1, 1]), block([2, 2]), block([2, 2]), block([3, 3]), block([4])]
    sel = SELECTORS.build(cfg(name="diversity"), StrategyContext(seed=0)).select(model, pool, 4, PAD)
    chosen_tokens = sorted(int(pool[i].tokens[0]) for i in sel.indices)
    assert chosen_tokens == [1, 2, 3, 4]
    assert sel.scores is not None
    unpicked = [i for i in range(len(pool)) if i not in sel.indices]
    np.testing.assert_allclose(sel.scores[unpicked], 0.0, atol=1e-6)  # duplicates add nothing


def test_diversity_threshold_stops_at_near_duplicates() -> None:
    model = clustered(centres=3, per_centre=2, noise=0.01)
    pool = [block([t, t]) for t in range(1, 7)]  # three pairs of near-duplicates
    sel = SELECTORS.build(cfg(name="diversity", mode="threshold", threshold=0.5), StrategyContext(seed=0)).select(
        model, pool, 6, PAD
    )
    assert len(sel.indices) == 3
    assert sorted((int(pool[i].tokens[0]) - 1) // 2 for i in sel.indices) == [0, 1, 2]
    assert sel.unselected == 3


def test_coverage_covers_every_cluster_and_keeps_rare_ones() -> None:
    model = clustered(centres=4, per_centre=4)
    selector = SELECTORS.build(cfg(name="coverage", num_clusters=4, cluster_decay=1.0), StrategyContext(seed=0))
    balanced = [block([t, t]) for t in range(1, 17)]
    first = selector.select(model, balanced, 4, PAD)
    assert sorted((int(balanced[i].tokens[0]) - 1) // 4 for i in first.indices) == [0, 1, 2, 3]
    # Now the pool is flooded by cluster 0; the stream's memory keeps the rare clusters in.
    flooded = [block([1 + j % 4, 1 + j % 4]) for j in range(13)]
    flooded += [block([5, 5]), block([9, 9]), block([13, 13])]
    second = selector.select(model, flooded, 6, PAD)
    groups = sorted((int(flooded[i].tokens[0]) - 1) // 4 for i in second.indices)
    assert groups == [0, 0, 0, 1, 2, 3]
    assert second.stats["coverage_clusters_selected"] == 4.0


def test_coverage_restarts_clustering_when_the_embedding_size_changes() -> None:
    selector = SELECTORS.build(cfg(name="coverage", num_clusters=2), StrategyContext(seed=0))
    pool = [block([1, 1]), block([5, 5]), block([9, 9])]
    selector.select(clustered(centres=4, per_centre=4), pool, 2, PAD)
    wider = TableModel(torch.zeros(17, 17), torch.eye(17))
    sel = selector.select(wider, pool, 2, PAD)
    assert len(sel.indices) == 2
    assert selector.state_dict()["centroids"].shape == (2, 17)


def test_apportion_is_proportional_and_respects_room() -> None:
    shares = np.array([0.5, 0.3, 0.2])
    np.testing.assert_array_equal(apportion(shares, np.array([10, 10, 10]), 10), [5, 3, 2])
    np.testing.assert_array_equal(apportion(shares, np.array([1, 10, 10]), 10), [1, 5, 4])
    assert apportion(shares, np.array([1, 1, 1]), 10).sum() == 3


# -- modes and weighting ------------------------------------------------------------------------


def test_sample_mode_follows_softmax_of_scores() -> None:
    gen = seeded_generator(0)
    scores = np.array([0.0, 0.0, 0.0, 3.0])
    hits = sum(choose_indices(scores, 1, "sample", 1.0, None, gen) == [3] for _ in range(3000))
    expected = np.exp(3.0) / (np.exp(3.0) + 3.0)
    assert abs(hits / 3000 - expected) < 0.03
    cold = [
        choose_indices(scores + [0, 0.1, 0.2, 0], 2, "sample", 1e-3, None, gen) for _ in range(20)
    ]
    assert all(picks == [3, 2] for picks in cold)  # temperature -> 0 is topk
    picks = choose_indices(np.arange(8.0), 8, "sample", 1.0, None, gen)
    assert sorted(picks) == list(range(8))  # without replacement


def test_threshold_mode_keeps_only_scores_above_and_counts_the_rest() -> None:
    model = confident_counter()
    pool = [block([1, 2, 3]), block([9, 10, 11]), block([2, 3, 4]), block([12, 13, 14])]
    config = cfg(name="entropy", mode="threshold", threshold=1.0)
    sel = SELECTORS.build(config, StrategyContext(seed=0)).select(model, pool, 3, PAD)
    assert sorted(sel.indices) == [1, 3]
    assert sel.unselected == 2
    none = SELECTORS.build(cfg(name="entropy", mode="threshold", threshold=99.0), StrategyContext(seed=0))
    empty = none.select(model, pool, 3, PAD)
    assert empty.indices == [] and empty.unselected == 4


def test_weights_are_proportional_with_mean_one() -> None:
    model = confident_counter()
    pool = [block([1, 5, 3, 7]), block([9, 10, 11]), block([4, 2, 6, 1]), block([1, 2, 3])]
    sel = SELECTORS.build(cfg(name="loss", weighting=True), StrategyContext(seed=0)).select(model, pool, 3, PAD)
    assert sel.weights is not None and sel.scores is not None
    assert sel.weights.shape == (3,)
    assert float(sel.weights.mean()) == pytest.approx(1.0, rel=1e-6)
    ratio = sel.weights / sel.scores[sel.indices]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    np.testing.assert_allclose(normalised_weights(np.zeros(3), [0, 1]), [1.0, 1.0])


# -- random, edge cases, state ------------------------------------------------------------------


def test_random_selects_distinct_indices_without_the_model() -> None:
    selector = SELECTORS.build(cfg(name="random", pool_factor=4), StrategyContext(seed=3))
    assert not selector.needs_model and selector.pool_factor == 4
    pool = [block([t]) for t in range(1, 13)]
    sel = selector.select(None, pool, 3, PAD)  # type: ignore[arg-type]
    assert len(set(sel.indices)) == 3 and sel.unselected == 9
    assert sel.scores is None and sel.weights is None
    again = SELECTORS.build(cfg(name="random"), StrategyContext(seed=3)).select(None, pool, 3, PAD)  # type: ignore[arg-type]
    assert again.indices == sel.indices


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_k_larger_than_pool_and_empty_pool(name: str) -> None:
    model = clustered(centres=2, per_centre=2)
    selector = SELECTORS.build(cfg(name=name), StrategyContext(seed=0))
    sel = selector.select(model, [block([1, 2]), block([3, 4])], 5, PAD)
    assert sorted(sel.indices) == [0, 1] and sel.unselected == 0
    empty = selector.select(model, [], 5, PAD)
    assert empty.indices == [] and empty.unselected == 0


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_state_round_trip_gives_identical_next_selection(name: str) -> None:
    model = clustered(centres=4, per_centre=4)
    rng = np.random.default_rng(0)
    pools = [[block(rng.integers(1, 17, size=3).tolist()) for _ in range(12)] for _ in range(3)]
    sampled = {} if name == "random" else {"mode": "sample", "temperature": 0.5}
    clusters = {"num_clusters": 4} if name == "coverage" else {}
    config = cfg(name=name, **sampled, **clusters)
    original: Selector = SELECTORS.build(config, StrategyContext(seed=7))
    original.select(model, pools[0], 4, PAD)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)  # tensors and plain values only: no pickle
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    want: list[Selection] = [original.select(model, p, 4, PAD) for p in pools[1:]]
    resumed = SELECTORS.build(config, StrategyContext(seed=123))
    resumed.load_state_dict(state)
    got = [resumed.select(model, p, 4, PAD) for p in pools[1:]]
    for a, b in zip(want, got, strict=True):
        assert a.indices == b.indices
        if a.scores is not None:
            np.testing.assert_array_equal(a.scores, b.scores)
    assert isinstance(original, Selector)


def test_loading_another_selectors_state_fails_clearly() -> None:
    state = SELECTORS.build(cfg(name="loss"), StrategyContext(seed=0)).state_dict()
    with pytest.raises(CheckpointError, match="'loss'.*'entropy'"):
        SELECTORS.build(cfg(name="entropy"), StrategyContext(seed=0)).load_state_dict(state)


# -- config -------------------------------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    default = SelectorConfig()
    assert (default.name, default.pool_factor, default.mode) == ("random", 1, "topk")
    with pytest.raises(ValidationError, match="requires selector.threshold"):
        SelectorConfig(name="entropy", mode="threshold")
    for bad in ({"pool_factor": 0}, {"name": "loss", "temperature": 0.0}, {"name": "entropyy"}, {"poolfactor": 2}):
        with pytest.raises(ValidationError):
            SelectorConfig(**bad)
    assert SelectorConfig(name="entropy", mode="threshold", threshold=0.5).threshold == 0.5
    for field in SelectorConfig.model_fields.values():
        assert field.description
