"""One contract for every strategy family: built from ``(config, context)`` through a registry.

Selectors, batch policies, replay buffers, distillers, regularisers and partial-update plans
are all made the same way::

    part = SELECTORS.build(recipe.selector, context)      # the registry of the family
    part.state_dict() / part.load_state_dict(state)       # checkpointed by the engine in one place

* ``config`` is the family's recipe section; the registry reads its discriminator (``name``,
  ``policy`` or ``method``) to pick the factory.
* ``context`` (:class:`StrategyContext`) is everything else a part may need and only the
  engine knows: the seed, the run directory, the process rank, a clock, a model loader.
* Every family registers a no-op under ``none`` where "absent" is a valid choice, so the
  training loop never branches on a missing part.

Adding a strategy is one file plus one registry line, also from outside the package::

    from olm_cli.distill import DISTILLERS
    DISTILLERS.register("my_kd", MyDistiller)      # MyDistiller(config, context)

A registry holds either classes or ``"module:attribute"`` strings resolved on first use, so
that validating a recipe (which checks names against the registries) never imports torch.
"""

from __future__ import annotations

import difflib
import importlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy may need besides its own recipe section, provided by the engine.

    Tests build one with the defaults; the engine fills in what it knows. Keep it small: a
    field belongs here only when a strategy cannot be written without it.
    """

    seed: int = 0
    run_dir: Path | None = None  # where a part may keep working files (the replay segments)
    rank: int = 0
    world_size: int = 1
    is_main: bool = True  # only the main process writes files shared by all ranks
    recipe: Any = None  # the whole recipe, for parts that read another section (e.g. distill.alpha)
    clock: Callable[[], float] = time.monotonic
    memory_probe: Any = None  # the resource batch policy's probe (injectable in tests)
    load_model: Callable[..., Any] | None = None  # load_model(path, trust_remote_code=False): on the training device
    say: Callable[[str], object] = lambda _message: None  # a line for the user (main process only)
    extras: dict[str, Any] = field(default_factory=dict)  # for strategies registered from outside


class Registry(Generic[T]):
    """Recipe short name -> factory ``(config, context) -> T`` for one strategy family."""

    def __init__(self, family: str, key: str) -> None:
        self.family = family  # the recipe section, e.g. "distill"
        self.key = key  # its discriminator field, e.g. "method"
        self._factories: dict[str, Callable[[Any, StrategyContext], T] | str] = {}

    def register(self, name: str, factory: Callable[[Any, StrategyContext], T] | str) -> None:
        """Make ``name`` a valid value of ``<family>.<key>`` in recipes.

        ``factory`` is a class (or function) taking ``(config, context)``, or a
        ``"package.module:Name"`` string imported on first use.
        """
        if name in self._factories:
            raise ValueError(f"{self.family}.{self.key} {name!r} is already registered")
        self._factories[name] = factory

    def unregister(self, name: str) -> None:
        """Remove a strategy (tests that register a toy clean up after themselves)."""
        del self._factories[name]

    def names(self) -> list[str]:
        return list(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self._factories)

    def check(self, name: str) -> str:
        """``name`` if registered; else a ValueError naming the choices (pydantic reports it)."""
        if name in self._factories:
            return name
        close = difflib.get_close_matches(name, self._factories, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        choices = ", ".join(repr(n) for n in self._factories)
        raise ValueError(f"unknown {self.family} {self.key} {name!r}{hint} (choose from {choices})")

    def factory(self, name: str) -> Callable[[Any, StrategyContext], T]:
        factory = self._factories[self.check(name)]
        if isinstance(factory, str):
            module, _, attribute = factory.partition(":")
            factory = getattr(importlib.import_module(module), attribute)
            self._factories[name] = factory
        return factory

    def build(self, config: Any, context: StrategyContext | None = None) -> T:
        """The strategy ``config`` names, made from its section and the context."""
        return self.factory(getattr(config, self.key))(config, context or StrategyContext())
