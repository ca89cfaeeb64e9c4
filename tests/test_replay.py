"""Replay buffer behaviour: each policy's rule, capacity, persistence and determinism."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from olm_cli.errors import CheckpointError
from olm_cli.replay import (
    REPLAY_BUFFERS,
    REPLAY_POLICIES,
    DiskReplayBuffer,
    NoReplay,
    ReplayBuffer,
    ReplayConfig,
    expand_seed_paths,
    seed_buffer,
)
from olm_cli.samples import Block
from olm_cli.strategy import StrategyContext

# chi-square critical values at p = 0.001
CHI2_999 = {9: 27.88, 19: 43.82}


def block(i: int, length: int = 4, domain: str = "web", shard: str = "s0") -> Block:
    """Tokens encode the sample number so tests can tell samples apart."""
    return Block(np.full(length, i, dtype=np.int32), shard=shard, domain=domain)


def make(tmp_path: Path, seed: int = 0, name: str = "replay", **kwargs) -> DiskReplayBuffer:
    """A buffer of the run directory ``tmp_path / name``, built as the engine builds it."""
    context = StrategyContext(seed=seed, run_dir=tmp_path / name)
    buffer = REPLAY_BUFFERS.build(ReplayConfig(**kwargs), context)
    assert isinstance(buffer, DiskReplayBuffer)
    return buffer


def contents(buffer: DiskReplayBuffer) -> set[int]:
    return {int(item.tokens[0]) for item in buffer.items()}


def test_registry_builds_every_policy_in_the_run_directory(tmp_path: Path) -> None:
    """Every recipe name builds; disk buffers work in RUN/replay/rank<rank>."""
    assert set(REPLAY_BUFFERS) == {"none", *REPLAY_POLICIES}
    for policy in REPLAY_POLICIES:
        context = StrategyContext(seed=0, run_dir=tmp_path / policy, rank=3)
        buffer = REPLAY_BUFFERS.build(ReplayConfig(policy=policy), context)
        assert isinstance(buffer, DiskReplayBuffer) and buffer.policy_name == policy
        assert buffer.root == tmp_path / policy / "replay" / "rank3"
        buffer.add([block(1)], step=1)
        assert (buffer.root / "segments").is_dir() and len(buffer) == 1
        assert buffer.state_dict() == {}  # everything is in the on-disk snapshot
        buffer.close()
    with pytest.raises(ValueError, match="context.run_dir"):
        REPLAY_BUFFERS.build(ReplayConfig(policy="fifo"), StrategyContext())


def test_none_policy_builds_a_buffer_that_does_nothing(tmp_path: Path) -> None:
    buffer = REPLAY_BUFFERS.build(ReplayConfig(), StrategyContext(run_dir=tmp_path))
    assert isinstance(buffer, NoReplay) and isinstance(buffer, ReplayBuffer)
    buffer.add([block(i) for i in range(5)], step=1, scores=[1.0] * 5)
    buffer.update_scores([0, 1], [2.0, 3.0])
    assert len(buffer) == 0 and buffer.num_tokens == 0
    assert buffer.sample(3) == [] and buffer.sample(0) == []
    assert seed_buffer(buffer, (block(i) for i in range(10)), max_samples=4) == 4
    assert len(buffer) == 0
    buffer.save(tmp_path / "ckpt" / "replay")
    assert list(tmp_path.iterdir()) == []  # no scratch space, and no replay/ in checkpoints
    full = make(tmp_path, policy="fifo", capacity=4)
    full.add([block(i) for i in range(3)], step=1)
    full.save(tmp_path / "old" / "replay")
    buffer.load(tmp_path / "old" / "replay")  # a snapshot of an earlier policy is not read
    assert len(buffer) == 0 and buffer.state_dict() == {}
    buffer.load_state_dict({})
    buffer.close()


@pytest.mark.parametrize("policy", sorted(REPLAY_POLICIES))
def test_every_policy_satisfies_the_protocol_and_capacity(tmp_path: Path, policy: str) -> None:
    buffer = make(tmp_path, policy=policy, capacity=20)
    assert isinstance(buffer, ReplayBuffer)
    for step in range(10):
        buffer.add([block(step * 10 + j, domain=f"d{j % 3}") for j in range(10)], step)
        assert len(buffer) <= 20
    assert len(buffer) == 20
    assert buffer.num_tokens == 80
    drawn = buffer.sample(5)
    assert len(drawn) == 5 and all(item.tokens.dtype == np.int32 for item in drawn)
    assert buffer.sample(0) == []


def test_reservoir_is_uniform_over_the_stream(tmp_path: Path) -> None:
    """Each of 200 streamed samples must end up kept with probability 20/200."""
    stream, capacity, trials = 200, 20, 300
    kept_per_bucket = np.zeros(10)
    for trial in range(trials):
        buffer = make(tmp_path, seed=trial, name=f"r{trial}", policy="reservoir", capacity=capacity)
        for start in range(0, stream, 25):
            buffer.add([block(i) for i in range(start, start + 25)], step=start)
        kept = np.array(sorted(contents(buffer)))
        assert kept.size == capacity
        kept_per_bucket += np.bincount(kept // 20, minlength=10)
        buffer.close()
        shutil.rmtree(tmp_path / f"r{trial}")
    expected = trials * capacity / 10
    chi2 = float(((kept_per_bucket - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[9], (chi2, kept_per_bucket)


def test_reservoir_draws_are_uniform(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="reservoir", capacity=20)
    buffer.add([block(i) for i in range(20)], step=0)
    counts = np.zeros(20)
    for _ in range(500):
        for item in buffer.sample(4):
            counts[item.tokens[0]] += 1
    expected = counts.sum() / 20
    assert float(((counts - expected) ** 2 / expected).sum()) < CHI2_999[19]


def test_fifo_keeps_the_most_recent(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="fifo", capacity=10)
    for step in range(7):
        buffer.add([block(step * 5 + j) for j in range(5)], step)
        buffer.sample(3)  # replaying must not change what FIFO evicts
    assert contents(buffer) == set(range(25, 35))


def test_lru_evicts_the_least_recently_replayed(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="lru", capacity=10)
    buffer.add([block(i) for i in range(10)], step=0)
    replayed = {int(item.tokens[0]) for item in buffer.sample(4)}
    buffer.add([block(i) for i in range(100, 106)], step=1)
    # the 6 never-replayed old samples went first
    assert contents(buffer) == replayed | set(range(100, 106))
    buffer.add([block(200 + i) for i in range(2)], step=2)
    # then the replayed ones, least recently replayed first: the two earliest in draw order
    assert replayed - contents(buffer) and len(replayed & contents(buffer)) == 2


def test_priority_keeps_and_prefers_high_scores(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="priority", capacity=10, priority_ageing=0.0)
    scores = np.random.default_rng(0).permutation(100).astype(float) + 1.0
    buffer.add([block(i) for i in range(100)], step=0, scores=scores.tolist())
    kept = contents(buffer)
    assert kept == set(np.argsort(scores)[-10:].tolist())
    draws = [int(item.tokens[0]) for _ in range(400) for item in buffer.sample(5)]
    freq = {i: draws.count(i) / len(draws) for i in kept}
    best, worst = max(kept, key=lambda i: scores[i]), min(kept, key=lambda i: scores[i])
    assert freq[best] > freq[worst]
    # proportional: frequency ratio follows the score ratio
    assert freq[best] / freq[worst] == pytest.approx(scores[best] / scores[worst], rel=0.25)


def test_priority_ageing_lowers_old_scores(tmp_path: Path) -> None:
    """A: 10 at step 0, B: 5 at step 1000, then C: 4.5 at step 1000 into a 2-slot buffer."""
    outcomes = {}
    for ageing in (0.0, 0.001):
        buffer = make(
            tmp_path, name=f"a{ageing}", policy="priority", capacity=2, priority_ageing=ageing
        )
        buffer.add([block(0)], step=0, scores=[10.0])
        buffer.add([block(1)], step=1000, scores=[5.0])
        buffer.add([block(2)], step=1000, scores=[4.5])
        outcomes[ageing] = contents(buffer)
    assert outcomes[0.0] == {0, 1}  # without ageing C is the weakest and is dropped
    assert outcomes[0.001] == {1, 2}  # 10 * e^-1 = 3.7 < 4.5: A aged out
    # re-scoring refreshes the age: A measured again now at 10 beats everyone
    buffer = make(tmp_path, name="rescore", policy="priority", capacity=2, priority_ageing=0.001)
    buffer.add([block(0)], step=0, scores=[10.0])
    buffer.add([block(1)], step=1000, scores=[5.0])
    buffer.update_scores([0], [10.0])
    buffer.add([block(2)], step=1000, scores=[6.0])
    assert contents(buffer) == {0, 2}


def test_domain_balanced_gives_equal_shares(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="domain_balanced", capacity=100)
    rng = np.random.default_rng(0)
    for step in range(50):
        domains = rng.choice(["web", "code", "math"], p=[0.8, 0.15, 0.05], size=40)
        buffer.add([block(step * 40 + j, domain=d) for j, d in enumerate(domains)], step)
    shares = {d: 0 for d in ("web", "code", "math")}
    for item in buffer.items():
        shares[item.domain] += 1
    assert len(buffer) == 100
    assert all(32 <= n <= 35 for n in shares.values()), shares
    draws = [item.domain for _ in range(300) for item in buffer.sample(6)]
    for domain in shares:
        assert draws.count(domain) / len(draws) == pytest.approx(1 / 3, abs=0.05)


def test_domain_balanced_in_tokens(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="domain_balanced", capacity=400, capacity_unit="tokens")
    for step in range(30):
        buffer.add([block(step * 10 + j, length=8, domain="a") for j in range(9)], step)
        buffer.add([block(10_000 + step, length=2, domain="b")], step)
    tokens = {"a": 0, "b": 0}
    for item in buffer.items():
        tokens[item.domain] += len(item.tokens)
    assert buffer.num_tokens <= 400
    assert tokens["b"] == 60 and tokens["a"] >= 200  # b keeps all it ever sent, a fills the rest


def test_importance_weights_are_normalised_and_proportional(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="importance", capacity=4, importance_smoothing=0.0)
    buffer.add([block(i) for i in range(4)], step=0, scores=[1.0, 2.0, 3.0, 4.0])
    counts = np.zeros(4)
    weight_of: dict[int, float] = {}
    weights = []
    for _ in range(2500):
        for item in buffer.sample(8):
            i = int(item.tokens[0])
            counts[i] += 1
            weight_of[i] = item.weight
            weights.append(item.weight)
    q = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(counts / counts.sum(), q, atol=0.01)
    np.testing.assert_allclose([weight_of[i] for i in range(4)], 1 / (4 * q))
    assert np.mean(weights) == pytest.approx(1.0, abs=0.02)  # unbiased: E_q[w] = 1
    assert float((q * (1 / (4 * q))).sum()) == pytest.approx(1.0)


def test_importance_smoothing_bounds_weights(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="importance", capacity=3, importance_smoothing=0.2)
    buffer.add([block(i) for i in range(3)], step=0, scores=[0.0, 1.0, 1000.0])
    weights = [item.weight for _ in range(200) for item in buffer.sample(4)]
    assert max(weights) <= 1 / 0.2 + 1e-9
    # a zero-score sample is still drawn through the uniform share
    assert any(item.tokens[0] == 0 for _ in range(100) for item in buffer.sample(4))


def test_capacity_in_samples_with_variable_lengths(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="fifo", capacity=5)
    buffer.add([block(i, length=i + 1) for i in range(8)], step=0)
    lengths = sorted(len(item.tokens) for item in buffer.items())
    assert lengths == [4, 5, 6, 7, 8] and buffer.num_tokens == 30


@pytest.mark.parametrize("policy", ["reservoir", "fifo", "lru", "priority", "importance"])
def test_capacity_in_tokens(tmp_path: Path, policy: str) -> None:
    buffer = make(tmp_path, policy=policy, capacity=50, capacity_unit="tokens")
    rng = np.random.default_rng(1)
    for step in range(40):
        lengths = rng.integers(1, 12, size=5)
        buffer.add([block(step * 5 + j, length=int(n)) for j, n in enumerate(lengths)], step)
        assert buffer.num_tokens <= 50
        assert buffer.num_tokens == sum(len(item.tokens) for item in buffer.items())
    assert buffer.num_tokens >= 35  # it does fill up
    buffer.add([block(999, length=51)], step=41)  # can never fit: dropped, not an error
    assert 999 not in contents(buffer)


def test_variable_length_tokens_round_trip(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="fifo", capacity=100)
    rng = np.random.default_rng(3)
    originals = [
        rng.integers(0, 50_000, size=int(n)).astype(np.int32) for n in rng.integers(1, 300, 40)
    ]
    buffer.add([Block(t, shard=f"s{i}", domain="d") for i, t in enumerate(originals)], step=3)
    got = {item.shard: item.tokens for item in buffer.items()}
    for i, tokens in enumerate(originals):
        np.testing.assert_array_equal(got[f"s{i}"], tokens)


def run_steps(buffer: DiskReplayBuffer, start: int, stop: int) -> list[tuple]:
    """A training-like sequence of calls; returns everything observable."""
    trace = []
    rng = np.random.default_rng(start)  # the caller's randomness, independent of the buffer
    for step in range(start, stop):
        blocks = [
            block(
                step * 8 + j,
                length=int(rng.integers(2, 9)),
                domain=f"d{j % 3}",
                shard=f"s{step % 4}",
            )
            for j in range(8)
        ]
        buffer.add(blocks, step, scores=rng.random(8).tolist())
        drawn = buffer.sample(5)
        buffer.update_scores([item.id for item in drawn], rng.random(len(drawn)).tolist())
        trace.append([(i.id, i.tokens.tolist(), i.domain, i.shard, i.weight) for i in drawn])
        trace.append((len(buffer), buffer.num_tokens))
    return trace


@pytest.mark.parametrize("policy", sorted(REPLAY_POLICIES))
@pytest.mark.parametrize("unit", ["samples", "tokens"])
def test_save_load_resumes_bit_identically(tmp_path: Path, policy: str, unit: str) -> None:
    capacity = 30 if unit == "samples" else 150
    kwargs = dict(policy=policy, capacity=capacity, capacity_unit=unit)
    uninterrupted = make(tmp_path, seed=7, name="a", **kwargs)
    run_steps(uninterrupted, 0, 20)
    uninterrupted.save(tmp_path / "ckpt" / "replay")
    expected = run_steps(uninterrupted, 20, 40)

    resumed = make(tmp_path, seed=12345, name="b", **kwargs)  # seed is overridden by the snapshot
    resumed.load(tmp_path / "ckpt" / "replay")
    assert run_steps(resumed, 20, 40) == expected


def test_load_discards_what_happened_after_the_snapshot(tmp_path: Path) -> None:
    """kill -9 after the checkpoint: the same scratch root is reused and must not leak."""
    buffer = make(tmp_path, seed=1, policy="reservoir", capacity=20)
    run_steps(buffer, 0, 10)
    buffer.save(tmp_path / "ckpt")
    expected = run_steps(buffer, 10, 20)
    buffer.close()
    restarted = make(tmp_path, seed=1, policy="reservoir", capacity=20)  # same root
    restarted.load(tmp_path / "ckpt")
    assert run_steps(restarted, 10, 20) == expected


def test_snapshot_survives_deletion_of_an_older_one(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="fifo", capacity=50)
    buffer.add([block(i) for i in range(30)], step=0)
    buffer.save(tmp_path / "step-1" / "replay")
    buffer.add([block(i) for i in range(30, 60)], step=1)
    buffer.save(tmp_path / "step-2" / "replay")
    buffer.add([block(i) for i in range(60, 90)], step=2)  # keeps writing after the snapshots
    shutil.rmtree(tmp_path / "step-1")
    restored = make(tmp_path, name="other", policy="fifo", capacity=50)
    restored.load(tmp_path / "step-2" / "replay")
    assert contents(restored) == set(range(10, 60))


def test_interrupted_save_leaves_previous_snapshot_intact(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="fifo", capacity=50)
    buffer.add([block(i) for i in range(20)], step=0)
    buffer.save(tmp_path / "good")
    buffer.add([block(i) for i in range(20, 40)], step=1)
    buffer.save(tmp_path / "partial")
    (tmp_path / "partial" / "manifest.json").unlink()  # crash before the manifest
    other = make(tmp_path, name="other", policy="fifo", capacity=50)
    with pytest.raises(CheckpointError, match="missing manifest"):
        other.load(tmp_path / "partial")
    other.load(tmp_path / "good")
    assert contents(other) == set(range(20))


def test_save_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="fifo", capacity=5)
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        buffer.save(tmp_path / "snap")


def test_load_rejects_another_policy(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="fifo", capacity=5)
    buffer.save(tmp_path / "snap")
    with pytest.raises(CheckpointError, match="policy 'fifo'"):
        make(tmp_path, name="b", policy="lru", capacity=5).load(tmp_path / "snap")


def test_stored_logits_round_trip(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="fifo", capacity=10, store_logits_topk=3)
    rng = np.random.default_rng(0)
    blocks, logits = [], []
    for i, length in enumerate((5, 1, 9)):
        blocks.append(block(i, length=length))
        values = rng.standard_normal((length, 3)).astype(np.float16)
        indices = rng.integers(0, 32_000, size=(length, 3)).astype(np.int32)
        logits.append((values, indices))
    buffer.add(blocks, step=0, logits=logits)
    buffer.add([block(7)], step=1)  # without logits
    buffer.save(tmp_path / "snap")
    restored = make(tmp_path, name="b", policy="fifo", capacity=10, store_logits_topk=3)
    restored.load(tmp_path / "snap")
    got = {int(item.tokens[0]): item for item in restored.items()}
    for i, (values, indices) in enumerate(logits):
        assert got[i].logits_values.dtype == np.float16
        np.testing.assert_array_equal(got[i].logits_values, values)
        np.testing.assert_array_equal(got[i].logits_indices, indices)
    assert got[7].logits_values is None and got[7].logits_indices is None
    with pytest.raises(ValueError, match="k = 2"):
        buffer.add([block(8, length=2)], step=2, logits=[(np.zeros((2, 2)), np.zeros((2, 2)))])


def test_sampling_counts_replays_and_update_scores_skips_evicted(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="fifo", capacity=3)
    buffer.add([block(i) for i in range(3)], step=0)
    ids = [item.id for item in buffer.sample(3)]
    buffer.add([block(i) for i in range(3, 6)], step=1)  # evicts all three
    buffer.update_scores(ids, [1.0, 2.0, 3.0])  # no error
    assert buffer.stats()["evicted"] == 3
    assert len(buffer.sample(10)) == 10  # more than the buffer holds: with replacement


def test_compaction_bounds_disk_use(tmp_path: Path) -> None:
    cfg = ReplayConfig(policy="reservoir", capacity=200)
    buffer = DiskReplayBuffer(cfg, StrategyContext(seed=0, run_dir=tmp_path), segment_bytes=4096)
    for step in range(200):
        buffer.add([block(step * 20 + j, length=16) for j in range(20)], step)
    live = buffer.num_tokens * 4
    assert buffer.store.disk_bytes <= 2 * live + 2 * 4096
    on_disk = sum(p.stat().st_size for p in (buffer.root / "segments").iterdir())
    assert on_disk == buffer.store.disk_bytes
    for item in buffer.items():  # relocated samples still read back correctly
        assert (item.tokens == item.tokens[0]).all()


def test_seed_buffer_caps_and_expands_globs(tmp_path: Path) -> None:
    buffer = make(tmp_path, policy="fifo", capacity=100)
    offered = seed_buffer(buffer, (block(i) for i in range(1000)), max_samples=300)
    assert offered == 300 and len(buffer) == 100
    (tmp_path / "shards").mkdir()
    for name in ("b.txt", "a.txt", "c.jsonl"):
        (tmp_path / "shards" / name).write_text("x")
    paths = expand_seed_paths(["shards/*.txt", "shards/a.txt"], tmp_path)
    assert [p.name for p in paths] == ["a.txt", "b.txt"]
    from olm_cli.errors import DataError

    with pytest.raises(DataError, match="matches no file"):
        expand_seed_paths(["nope/*.txt"], tmp_path)
