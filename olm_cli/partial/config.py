"""Recipe section ``train``: which parameters an increment may change, and LoRA adapters.

Kept free of torch and peft so that validating a recipe stays instant.
"""

from __future__ import annotations

from pydantic import Field

from olm_cli.config_base import Section


class LoraConfig(Section):
    """Low-rank adapters (peft) as the model-extension option."""

    r: int = Field(default=8, ge=1, description="Rank of the adapter matrices.")
    alpha: int = Field(default=16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="Module names (suffixes) that receive adapters, e.g. q_proj, v_proj.",
    )


class TrainConfig(Section):
    """Which parameters an increment may change."""

    trainable: list[str] = Field(
        default_factory=list,
        description=(
            "Parameter-name patterns that stay trainable; everything else is frozen. fnmatch "
            "globs (model.layers.0.*), or regular expressions prefixed with 're:' "
            "(re:model\\.layers\\.[01]\\..*). Empty means every parameter is trainable."
        ),
    )
    full_update_every: int = Field(
        default=0,
        ge=0,
        description=(
            "Every N-th increment (N, 2N, ...; increments count from 1) trains every parameter "
            "despite `trainable`. 0 means never."
        ),
    )
    lora: LoraConfig | None = Field(
        default=None,
        description="Train low-rank adapters instead of the full weights; merged into the weights on save.",
    )
