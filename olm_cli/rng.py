"""Every random generator the run uses, as a tree of tensors and plain values (no pickle).

Checkpointed with each step so that a resumed run draws exactly what the uninterrupted run
would have drawn: Python's ``random`` (selectors' tie-breaks), NumPy's global generator (replay
shares and draws) and torch's (dropout, sampling), CUDA included when present.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """The generators' states as a tree ``state_files.save_tree`` can store."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tree: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"name": np_name, "keys": np_keys, "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tree["cuda"] = {str(i): s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return tree


def restore_rng(tree: dict[str, Any]) -> None:
    py = tree["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = tree["numpy"]
    np.random.set_state((npy["name"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    torch.set_rng_state(tree["torch"])
    if "cuda" in tree and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tree["cuda"][k] for k in sorted(tree["cuda"], key=int)])


def seed_everything(seed: int) -> None:
    """Seed every generator (an increment's start: the same seed gives the same increment)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
