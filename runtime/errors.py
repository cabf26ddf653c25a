"""The one walker over trio's exception groups.

trio wraps whatever escapes a nursery in (possibly nested) groups; callers
ask two questions of such a tree — is it nothing but these kinds (a client
going away), and is there one of this kind in it (the OSError to report in
one plain line) — and both are answered from its leaves.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """Every exception in ``exc`` that is not itself a group, depth first."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def consists_of(exc: BaseException, kinds: type[BaseException] | tuple[type[BaseException], ...]
                ) -> bool:
    """True if ``exc``, or every leaf of a group, is one of ``kinds``."""
    return all(isinstance(leaf, kinds) for leaf in leaves(exc))


def find_exception(exc: BaseException, kind: type[E]) -> E | None:
    """The first leaf of ``exc`` that is a ``kind``, if any."""
    for leaf in leaves(exc):
        if isinstance(leaf, kind):
            return leaf
    return None
