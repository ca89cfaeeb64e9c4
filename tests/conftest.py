"""Shared fixtures: small real shards and a recipe for a tiny from-scratch Llama.

Everything is built locally (tokenizer trained on the fixture text, model from a config), so the
tests never touch the network and each training run takes a few seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

# Tiny models run fastest on one thread, and a busy 2-core CI machine punishes oversubscription;
# subprocesses started by the tests inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

torch.set_num_threads(1)

WORDS = {
    "alpha": "the river runs past the old mill and the miller sings of bread flour wheat stone water".split(),
    "beta": "def return import class self value lambda yield async await list dict tuple int str".split(),
    "gamma": "king queen castle sword knight honour battle crown throne banner siege herald".split(),
}


def make_documents(domain: str, count: int, seed: int) -> list[str]:
    rng = random.Random(f"{domain}-{seed}")
    words = WORDS[domain]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(30, 90))) + "." for _ in range(count)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    return path


# The domain of a shard from its path: the directory name, less an ``NN-`` order prefix.
DOMAIN_PATTERN = r"(?:\d+-)?(?P<domain>[^/\\]+)[/\\][^/\\]+$"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 320-token BPE trained on the alpha and beta words (a module may define its own instead)."""
    from olm_cli.modeling import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    shard = write_jsonl(root / "t.jsonl", make_documents("alpha", 40, 0) + make_documents("beta", 40, 0))
    return train_tokenizer([shard], "text", vocab_size=320, limit_chars=100_000)


def add_shard(root: Path, domain: str, index: int, docs: int = 24, order: int | None = None) -> Path:
    order = order if order is not None else list(WORDS).index(domain)
    return write_jsonl(root / f"{order:02d}-{domain}" / f"shard-{index:03d}.jsonl", make_documents(domain, docs, index))


def tiny_llama(seed: int = 0, vocab: int = 64, hidden: int = 32, **config: Any) -> torch.nn.Module:
    """A two-layer Llama of a few thousand parameters, seeded, for unit tests of strategy parts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, **config,
    ))


def tiny_recipe(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "model": {
            "init": "scratch",
            "arch": {"size": "tiny", "vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128},
        },
        "data": {"shards": [str(tmp_path / "stream" / "*" / "*.jsonl")], "block_size": 32},
        "batch": {"size": 4, "micro_batch": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "run": {"dir": str(tmp_path / "run"), "checkpoint_every": 5, "progress": False},
    }
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    return recipe


def write_recipe(tmp_path: Path, recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture
def stream_dir(tmp_path: Path) -> Path:
    root = tmp_path / "stream"
    add_shard(root, "alpha", 0)
    add_shard(root, "alpha", 1)
    return root
