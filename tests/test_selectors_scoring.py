"""The one-pass scoring maths, checked against the definitions on a real tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from transformers import LlamaForCausalLM

from olm_cli.samples import Block, collate, per_sample_loss
from olm_cli.selectors import mean_token_entropy, score_pool

VOCAB = 64
PAD = 0



def block(tokens: list[int] | np.ndarray) -> Block:
    return Block(tokens=np.asarray(tokens, dtype=np.int32), shard="s", domain="d")


def counting(start: int, length: int) -> list[int]:
    return [1 + (start + i) % (VOCAB - 1) for i in range(length)]


@pytest.fixture(scope="module")
def trained_llama() -> LlamaForCausalLM:
    """A tiny Llama that has learnt "count upwards", so counting text is easy, noise is hard."""
    model = tiny_llama(vocab=VOCAB, max_position_embeddings=64)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, VOCAB, (16,), generator=gen).tolist()
        batch = collate([np.asarray(counting(s, 12)) for s in starts], PAD)
        loss = model(**batch).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    return model


def test_entropy_and_loss_match_definitions_with_padding() -> None:
    model = tiny_llama(vocab=VOCAB, max_position_embeddings=64)
    rng = np.random.default_rng(0)
    blocks = [block(rng.integers(1, VOCAB, size=n)) for n in (5, 9, 1, 7, 9, 3)]
    pool = score_pool(model, blocks, PAD, micro_batch=4)
    batch = collate([b.tokens for b in blocks], PAD)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want_loss, counts = per_sample_loss(logits, batch["labels"])
    want_entropy = mean_token_entropy(logits, batch["attention_mask"])
    np.testing.assert_allclose(pool.loss, want_loss.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pool.entropy, want_entropy.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(pool.tokens, counts.numpy())
    assert pool.loss[2] == 0.0 and pool.entropy[2] == 0.0  # a 1-token block predicts nothing
    # Padding must not change a candidate's measurements: score one alone and compare.
    alone = score_pool(model, blocks[3:4], PAD, micro_batch=1)
    np.testing.assert_allclose(alone.embeddings[0], pool.embeddings[3], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(alone.gradnorm[0], pool.gradnorm[3], rtol=1e-4)


def test_scoring_restores_train_mode_and_needs_no_grad() -> None:
    model = tiny_llama(vocab=VOCAB, max_position_embeddings=64)
    model.train()
    score_pool(model, [block(counting(0, 6))], PAD, micro_batch=2)
    assert model.training
    model.eval()
    score_pool(model, [block(counting(0, 6))], PAD, micro_batch=2)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def brute_force_head_gradnorm(model: LlamaForCausalLM, tokens: np.ndarray) -> float:
    """||d mean-CE / d lm_head.weight||_F from a real backward pass on one sample."""
    model.zero_grad()
    batch = collate([tokens], PAD)
    loss, _ = per_sample_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    loss.sum().backward()
    grad = model.lm_head.weight.grad
    assert grad is not None
    return float(grad.norm())


def test_gradnorm_is_exact_for_one_predicted_token(trained_llama: LlamaForCausalLM) -> None:
    rng = np.random.default_rng(1)
    blocks = [block(rng.integers(1, VOCAB, size=2)) for _ in range(6)]
    blocks += [block(counting(s, 2)) for s in (3, 17, 40)]
    pool = score_pool(trained_llama, blocks, PAD, micro_batch=4)
    exact = [brute_force_head_gradnorm(trained_llama, b.tokens) for b in blocks]
    np.testing.assert_allclose(pool.gradnorm, exact, rtol=1e-4)


def test_gradnorm_bounds_and_tracks_exact_on_long_samples(trained_llama: LlamaForCausalLM) -> None:
    rng = np.random.default_rng(2)
    blocks = [block(counting(s, 12)) for s in (0, 9, 21, 33, 50)]
    blocks += [block(rng.integers(1, VOCAB, size=12)) for _ in range(5)]
    # Half-and-half: the sample's first part counts, the rest is noise.
    blocks += [block(counting(s, 6) + rng.integers(1, VOCAB, size=6).tolist()) for s in (5, 30)]
    pool = score_pool(trained_llama, blocks, PAD, micro_batch=5)
    exact = np.array([brute_force_head_gradnorm(trained_llama, b.tokens) for b in blocks])
    assert np.all(pool.gradnorm >= exact * (1 - 1e-4))  # triangle inequality: an upper bound
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    spearman = np.corrcoef(rank(pool.gradnorm), rank(exact))[0, 1]
    assert spearman > 0.8
    # Counting text is learnt, so both measures rank it below noise.
    assert pool.gradnorm[:5].max() < pool.gradnorm[5:10].min()
