"""The vocabulary of the checkpoint name maps.

A name map turns the keys of a source checkpoint (diffusers, transformers or sgm) into the parameters of our model.
It is a list of explicit rules, one per target parameter, plus the source keys that are dropped on purpose, each with
its reason. Nothing is matched by position or by sorting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

Combine = Callable[[Sequence[np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Rule:
    """One target parameter, built from one or more source tensors.

    `combine` receives the source arrays in the order of `sources`; None means a single source copied as it is.
    A combine must be a pure array function: it is also run on zero-filled stand-ins to check shapes without weights.
    """

    target: str
    sources: tuple[str, ...]
    combine: Combine | None = None

    def apply(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        if self.combine is None:
            if len(arrays) != 1:
                raise ValueError(f"rule for {self.target} has {len(arrays)} sources and no combine")
            return arrays[0]
        return self.combine(arrays)


@dataclass
class NameMap:
    """Rules for every target parameter, and the source keys deliberately left out (key -> reason)."""

    rules: list[Rule]
    dropped: dict[str, str]

    def prefixed(self, target_prefix: str = "", source_prefix: str = "") -> NameMap:
        return NameMap(
            rules=[
                Rule(target_prefix + r.target, tuple(source_prefix + s for s in r.sources), r.combine)
                for r in self.rules
            ],
            dropped={source_prefix + k: v for k, v in self.dropped.items()},
        )

    def __add__(self, other: NameMap) -> NameMap:
        return NameMap(self.rules + other.rules, {**self.dropped, **other.dropped})


def rename(target: str, source: str | None = None) -> Rule:
    """A plain copy: `source` (default: the same name) becomes `target`."""
    return Rule(target, (source if source is not None else target,))
