"""repe: the core of the representation-engineering workbench (models, sites, capture, datasets, I/O).

The names below load on first use (PEP 562), so ``import repe`` (and ``repe --help``) does not pay for
torch and transformers until something needs them."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# the test suite's shape checker (stdlib imports only): jaxtyping's import hook names it as
# ``repe.typecheck.shapes`` while it decorates this very module, so it must be loaded first
import repe.typecheck  # noqa: F401

if TYPE_CHECKING:
    from repe.activations import ActivationSet
    from repe.capture import capture
    from repe.chat import messages, render
    from repe.models import LoadedModel, ModelIdentity, load_model, tiny_model
    from repe.positions import AllTokens, FromAssistant, Index, Last, Mean
    from repe.sites import Site, parse_site, resolve_sites

_WHERE = {
    "ActivationSet": "repe.activations",
    "capture": "repe.capture",
    "messages": "repe.chat",
    "render": "repe.chat",
    "LoadedModel": "repe.models",
    "ModelIdentity": "repe.models",
    "load_model": "repe.models",
    "tiny_model": "repe.models",
    "AllTokens": "repe.positions",
    "FromAssistant": "repe.positions",
    "Index": "repe.positions",
    "Last": "repe.positions",
    "Mean": "repe.positions",
    "Site": "repe.sites",
    "parse_site": "repe.sites",
    "resolve_sites": "repe.sites",
}

__all__ = [
    "ActivationSet",
    "AllTokens",
    "FromAssistant",
    "Index",
    "Last",
    "LoadedModel",
    "Mean",
    "ModelIdentity",
    "Site",
    "capture",
    "load_model",
    "messages",
    "parse_site",
    "render",
    "resolve_sites",
    "tiny_model",
]
assert sorted(__all__) == sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'repe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


class _Package(types.ModuleType):
    """``repe.capture`` is both a submodule and the function it defines. Importing the submodule makes
    Python set the package attribute to the module; keep the function there instead (as the eager
    ``from repe.capture import capture`` of earlier versions did)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            name in _WHERE
            and isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
            and hasattr(value, name)
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
