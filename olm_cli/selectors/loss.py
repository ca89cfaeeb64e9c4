"""``loss``: prefer candidates the model predicts worst (high mean next-token cross-entropy).

Loss is the most direct "not learnt yet" signal, and the same number is free to reuse as a
replay priority.
"""

from __future__ import annotations

from olm_cli.selectors.pool_score import PoolScoreSelector


class LossSelector(PoolScoreSelector):
    """Ranks the pool by ``PoolScores.loss`` under the configured mode."""

    name = "loss"
    score_field = "loss"
