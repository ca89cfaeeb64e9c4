"""``gradnorm``: prefer candidates whose LM-head gradient would be largest.

The gradient norm measures how far a sample would move the model. The closed-form bound
(see :func:`olm_cli.selectors.scoring._row_scores`) needs no backward pass per sample.
"""

from __future__ import annotations

from olm_cli.selectors.pool_score import PoolScoreSelector


class GradNormSelector(PoolScoreSelector):
    """Ranks the pool by ``PoolScores.gradnorm`` under the configured mode."""

    name = "gradnorm"
    score_field = "gradnorm"
