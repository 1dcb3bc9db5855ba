"""The typechecker the test suite hands jaxtyping's import hook: array shapes only.

``pytest`` runs with ``--jaxtyping-packages=repe,probes,steering,repe.typecheck.shapes``: every function
of the three packages is wrapped by ``jaxtyping.jaxtyped(typechecker=shapes)``. :func:`shapes` keeps only
the annotations that are jaxtyping arrays (``Float[Tensor, "n d"]``, optionally in a union, e.g. with
``None``) and checks those with beartype, with shape names bound across one call. Other annotations stay
unchecked: public functions validate what users pass (a wrong type, a NaN, a hidden size that does not
match) with their own one-line errors, and the tests of those errors must see them, not a type-check
error raised first.

Nothing here runs outside the test suite.
"""

from __future__ import annotations

import types
import typing
from typing import Any, no_type_check


@no_type_check
def is_array_hint(hint: Any) -> bool:
    """A jaxtyping array type, or a union or tuple with one among its members."""
    from jaxtyping import AbstractArray

    if isinstance(hint, type) and issubclass(hint, AbstractArray):
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType, tuple):
        return any(is_array_hint(a) for a in typing.get_args(hint))
    return False


@no_type_check
def shapes(fn: Any) -> Any:
    """``beartype(fn)`` checking only ``fn``'s array annotations (``fn`` is the stand-in function
    jaxtyping builds from the real one's signature, with annotations already resolved)."""
    from beartype import beartype

    annotations = getattr(fn, "__annotations__", None)
    if not annotations:
        return fn
    keep = {k: v for k, v in annotations.items() if is_array_hint(v)}
    if not keep:
        return fn
    fn.__annotations__ = keep
    return beartype(fn)
