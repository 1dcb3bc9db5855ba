"""Canonical site names and the one table that maps them onto every back-end.

A *site* is a place in the model where activations are read or written. Names follow TransformerLens:

=========================  =====================  ==============================  ===================
canonical                  HF hidden_states index  HF module hook                  llama.cpp
=========================  =====================  ==============================  ===================
blocks.L.hook_resid_pre    L                       forward-pre-hook on layers[L]   --
blocks.L.hook_resid_post   L+1 (not last block*)   forward hook on layers[L]       direction.L (L>=1)
blocks.L.attn.hook_z       --                      pre-hook on self_attn.o_proj     --
blocks.L.hook_attn_out     --                      forward hook on self_attn        --
blocks.L.hook_mlp_out      --                      forward hook on mlp              --
=========================  =====================  ==============================  ===================

(*) HF applies the final norm to ``hidden_states[n_layers]``, so the last block's residual output is only
reachable by a module hook. This file is the only place where these conventions are written down.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from repe.errors import SiteError

SiteKind = Literal["resid_pre", "resid_post", "attn_z", "attn_out", "mlp_out"]

_SUFFIX: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_z": "attn.hook_z",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
}
_KIND_OF_SUFFIX = {v: k for k, v in _SUFFIX.items()}
_NAME_RE = re.compile(
    r"^blocks\.(\d+)\.(" + "|".join(re.escape(s) for s in _SUFFIX.values()) + r")$"
)


@dataclass(frozen=True)
class HookSpec:
    """How the ``hf`` back-end reaches a site: a module (relative to the block) and a hook type."""

    submodule: str  # "" = the decoder block itself
    hook: Literal["pre", "post"]
    per_head: bool = False  # reshape the last dim to (n_heads, d_head)


# The table. One row per kind; every back-end reads it from here.
HF_HOOKS: dict[str, HookSpec] = {
    "resid_pre": HookSpec("", "pre"),
    "resid_post": HookSpec("", "post"),
    "attn_z": HookSpec("self_attn.o_proj", "pre", per_head=True),
    "attn_out": HookSpec("self_attn", "post"),
    "mlp_out": HookSpec("mlp", "post"),
}
# nnsight envoy paths relative to the decoder block, and whether .input or .output is read
NNSIGHT_PATHS: dict[str, tuple[str, Literal["input", "output"]]] = {
    "resid_pre": ("", "input"),
    "resid_post": ("", "output"),
    "attn_z": ("self_attn.o_proj", "input"),
    "attn_out": ("self_attn", "output"),
    "mlp_out": ("mlp", "output"),
}


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{_SUFFIX[self.kind]}"

    def __str__(self) -> str:
        return self.name

    # ---- the mapping, row by row ------------------------------------------------------------
    def hf_hidden_state_index(self, n_layers: int) -> int | None:
        """Index into HF ``output_hidden_states`` holding this site, or None where there is none."""
        if self.kind == "resid_pre":
            return self.layer
        if self.kind == "resid_post" and self.layer < n_layers - 1:
            return self.layer + 1
        return None

    @property
    def hf_hook(self) -> HookSpec:
        return HF_HOOKS[self.kind]

    @property
    def transformer_lens_name(self) -> str:
        return self.name

    @property
    def nnsight_path(self) -> tuple[str, Literal["input", "output"]]:
        return NNSIGHT_PATHS[self.kind]

    @property
    def llama_cpp_tensor(self) -> str | None:
        """Name of the llama.cpp control-vector tensor for this site (None if it cannot be carried)."""
        if self.kind == "resid_post" and self.layer >= 1:
            return f"direction.{self.layer}"
        return None

    @property
    def is_residual(self) -> bool:
        return self.kind in ("resid_pre", "resid_post")


@functools.lru_cache(maxsize=4096)
def _parse_name(name: str) -> Site:
    """The string part of :func:`parse_site`, memoised (steering parses every site on every toggle)."""
    m = _NAME_RE.match(name)
    if m is None:
        raise SiteError(
            f"unknown site {name!r}; valid forms are "
            + ", ".join(f"'blocks.{{L}}.{s}'" for s in _SUFFIX.values())
        )
    return Site(int(m.group(1)), _KIND_OF_SUFFIX[m.group(2)])


def parse_site(name: str | Site, n_layers: int | None = None) -> Site:
    """Parse ``blocks.{L}.hook_resid_post`` (and the other canonical forms) into a Site."""
    site = name if isinstance(name, Site) else _parse_name(str(name))
    if n_layers is not None and not 0 <= site.layer < n_layers:
        raise SiteError(
            f"site {site.name!r} is out of range: the model has {n_layers} blocks (layers 0..{n_layers - 1})"
        )
    return site


def all_sites(n_layers: int, kinds: Iterable[str] = tuple(_SUFFIX)) -> list[Site]:
    return [Site(layer, kind) for kind in kinds for layer in range(n_layers)]


SiteSpec = str | Site | Sequence[str | Site] | Callable[[str], bool]


def resolve_sites(spec: SiteSpec, n_layers: int) -> list[Site]:
    """Turn a site spec into a sorted list of sites.

    A spec is a canonical name, a glob (``"blocks.*.hook_resid_post"``), a list of either, or a predicate
    on the name. Unknown names and layers out of range raise :class:`SiteError`.
    """
    if callable(spec) and not isinstance(spec, str | Site):
        sites = [s for s in all_sites(n_layers) if spec(s.name)]
        if not sites:
            raise SiteError("the site predicate matched no site of this model")
        return sorted(set(sites))
    items: Sequence[str | Site] = [spec] if isinstance(spec, str | Site) else list(spec)
    if not items:
        raise SiteError("no sites requested: pass at least one site name")
    out: set[Site] = set()
    for item in items:
        if isinstance(item, str) and any(c in item for c in "*?["):
            matched = [s for s in all_sites(n_layers) if fnmatch.fnmatchcase(s.name, item)]
            if not matched:
                raise SiteError(
                    f"site pattern {item!r} matched no site of this {n_layers}-block model"
                )
            out.update(matched)
        else:
            out.add(parse_site(item, n_layers))
    return sorted(out, key=lambda s: (s.layer, list(_SUFFIX).index(s.kind)))


def resid_post_sites(layers: Iterable[int]) -> list[str]:
    """Convenience: canonical residual-stream output names for the given blocks."""
    return [Site(int(layer), "resid_post").name for layer in layers]
