"""``entropy``: prefer candidates the model is unsure about (high mean predictive entropy).

Entropy needs nothing beyond the model's own predictions and flags text the model has not
learnt yet -- but also noise; pair it with ``sample`` mode when the stream is noisy.
"""

from __future__ import annotations

from olm_cli.selectors.pool_score import PoolScoreSelector


class EntropySelector(PoolScoreSelector):
    """Ranks the pool by ``PoolScores.entropy`` under the configured mode."""

    name = "entropy"
    score_field = "entropy"
