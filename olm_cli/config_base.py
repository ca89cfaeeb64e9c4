"""Base classes for every recipe section: unknown keys are errors, values are validated on assignment.

A *strategy section* (``selector``, ``batch``, ``replay``, ``distill``, ``regularize``) picks one
strategy with a discriminator key (``selector.name``, ``batch.policy``, ...) and holds the knobs of
every strategy side by side, so ``cfg.num_clusters`` is always readable. A knob of a strategy that
is not selected would be silently ignored, so giving one is an error that names the strategies it
belongs to: ``selector.num_clusters: applies to selector 'coverage', not 'random'``.

The valid strategy names come from the family's registry (``strategy_registry``, see
:mod:`olm_cli.strategy`), so a strategy registered from outside olm is accepted by a recipe.
It has no strategy-specific keys of its own: a key declared with :func:`for_strategies` names
built-in strategies only, and giving one with a plugin strategy selected is an error.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    ModelWrapValidatorHandler,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError

from olm_cli.strategy import Registry

STRATEGIES_KEY = "strategies"
"""Key of ``json_schema_extra`` listing the strategies a field applies to (absent: every one)."""

IGNORE_INAPPLICABLE_KEYS = "ignore_inapplicable_keys"
"""Validation-context flag: drop keys of unselected strategies instead of rejecting them.

For recipes olm itself wrote into a run directory before this rule existed: those list every key
of every strategy (with its default), and refusing them would make an old run unreadable.
"""


def for_strategies(*names: str) -> dict[str, Any]:
    """``json_schema_extra`` declaring the only strategies a field applies to.

    Used as ``Field(..., json_schema_extra=for_strategies("coverage"))``: the declaration sits on
    the field itself, so there is no separate table to keep in sync with the schema.
    """
    if not names:
        raise ValueError("for_strategies needs at least one strategy name")
    return {STRATEGIES_KEY: list(names)}


def field_strategies(field: FieldInfo) -> tuple[str, ...] | None:
    """The strategies ``field`` is declared for, or None when it applies to every strategy."""
    extra = field.json_schema_extra
    if not isinstance(extra, dict) or STRATEGIES_KEY not in extra:
        return None
    names = extra[STRATEGIES_KEY]
    assert isinstance(names, list)
    return tuple(str(name) for name in names)


class Section(BaseModel):
    """A recipe section. ``extra="forbid"`` turns a typo into an error with a did-you-mean hint."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StrategySection(Section):
    """A section whose ``strategy_key`` field selects one strategy of ``strategy_registry``.

    Fields declared with :func:`for_strategies` are accepted only when the selected strategy is
    among those named. Only the keys present in the input mapping are checked (defaults of
    unselected strategies are harmless), and dumps leave such keys out, so a dumped recipe
    validates again.
    """

    strategy_registry: ClassVar[Registry[Any] | None] = None
    """The family's registry, whose names are the valid values of the discriminator (the
    discriminator field validates with ``registry.check``). None: a section whose discriminator
    is still a ``Literal``, whose arguments are then the names."""
    strategy_key: ClassVar[str]
    """Name of the discriminator field (``name``, ``policy``, ``method``)."""
    strategy_kind: ClassVar[tuple[str, str]]
    """How messages call one strategy and several: ``("selector", "selectors")``."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a declaration naming a strategy the discriminator does not offer (a typo).

        Checked against the registry as it is when the section is defined, i.e. the built-in
        strategies: a plugin registered later cannot be named by olm's own declarations.
        """
        super().__pydantic_init_subclass__(**kwargs)
        registry = cls.strategy_registry
        if registry is not None and registry.key != cls.strategy_key:
            raise TypeError(
                f"{cls.__name__}.strategy_key is {cls.strategy_key!r} but its registry "
                f"selects by {registry.family}.{registry.key}"
            )
        known = set(cls.strategy_names())
        for name, field in cls.model_fields.items():
            unknown = sorted(set(field_strategies(field) or ()) - known)
            if unknown:
                raise TypeError(
                    f"{cls.__name__}.{name} declares unknown {cls.strategy_kind[1]} {unknown}; "
                    f"{cls.strategy_key} offers {sorted(known)}"
                )

    @classmethod
    def strategy_names(cls) -> tuple[str, ...]:
        """Every valid strategy name, in registration (or ``Literal``) order, plugins included."""
        if cls.strategy_registry is not None:
            return tuple(cls.strategy_registry.names())
        return tuple(typing.get_args(cls.model_fields[cls.strategy_key].annotation))

    @classmethod
    def applies(cls, key: str, strategy: str) -> bool:
        """Whether field ``key`` matters to ``strategy`` (fields without a declaration always do)."""
        field = cls.model_fields.get(key)
        declared = field_strategies(field) if field is not None else None
        return declared is None or strategy in declared

    def uses(self, key: str) -> bool:
        """Whether field ``key`` matters to the strategy this section selects."""
        return self.applies(key, getattr(self, self.strategy_key))

    @classmethod
    def _inapplicable_message(cls, key: str, strategy: str) -> str:
        declared = field_strategies(cls.model_fields[key]) or ()
        singular, plural = cls.strategy_kind
        kind = singular if len(declared) == 1 else plural
        names = ", ".join(f"'{name}'" for name in declared)
        return f"applies to {kind} {names}, not '{strategy}'"

    @model_validator(mode="wrap")
    @classmethod
    def _reject_inapplicable_keys(
        cls, data: Any, handler: ModelWrapValidatorHandler[Any], info: ValidationInfo
    ) -> Any:
        """Reject keys of unselected strategies, together with every other error of the section.

        The rest of the section is validated in full without those keys, cross-field checks
        included, so one run reports everything (recipes report all errors at once); a wrap
        validator because the subclasses' "after" checks never run once it raises. Assignment
        hands over the model instance, not user input, and is not checked.
        """
        if not isinstance(data, Mapping):
            return handler(data)
        strategy = data.get(cls.strategy_key, cls.model_fields[cls.strategy_key].default)
        if strategy not in cls.strategy_names():
            return handler(data)  # an unknown strategy is reported by the field itself
        foreign = [key for key in data if key in cls.model_fields and not cls.applies(key, strategy)]
        if not foreign:
            return handler(data)
        applicable = {key: value for key, value in data.items() if key not in foreign}
        if info.context and info.context.get(IGNORE_INAPPLICABLE_KEYS):
            return handler(applicable)
        try:
            cls.model_validate(applicable, context=info.context)
            others: list[Any] = []
        except ValidationError as exc:
            others = list(exc.errors())  # rebuilt as they were: type, ctx and message
        inapplicable = [
            InitErrorDetails(
                type=PydanticCustomError("inapplicable_key", cls._inapplicable_message(key, strategy)),
                loc=(key,),
                input=data[key],
            )
            for key in foreign
        ]
        raise ValidationError.from_exception_data(cls.__name__, [*others, *inapplicable])

    @model_serializer(mode="wrap")
    def _dump_applicable_keys(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Leave out the keys of unselected strategies, so a dump (the run directory's resolved
        recipe, ``olm validate``) shows what is in effect and validates again."""
        dumped = handler(self)
        if not isinstance(dumped, dict):
            return dumped
        return {key: value for key, value in dumped.items() if self.uses(key)}

