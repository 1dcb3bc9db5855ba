"""One set of defaults for every shell (``repe steer``, ``repe export``, the app): which sites a
direction steers, which coefficient, and a calibrated strength, each with a line saying which."""

from __future__ import annotations

from collections.abc import Sequence

from repe.calibration import calibrate, is_calibrated
from repe.directions import Direction
from repe.models import LoadedModel


def default_sites(
    direction: Direction, sites: Sequence[str] | None = None, all_sites: bool = False
) -> tuple[Direction, str]:
    """The sites to steer: ``sites`` when given; else every site when ``all_sites``; else the
    direction's best site (recorded by the probe or coefficient sweep that made it); else every site."""
    if sites:
        return direction.select(list(sites)), f"sites {', '.join(sites)} (as asked)"
    if not all_sites and direction.best_site:
        return (
            direction.select(direction.best_site),
            f"site {direction.best_site} (the direction's best site; --all-sites steers all "
            f"{len(direction.sites)})",
        )
    return direction, f"all {len(direction.sites)} sites of the direction"


def default_coeff(direction: Direction, coeff: float | None) -> tuple[float, str]:
    """``coeff`` when given, else the direction's recommended coefficient; never a silent 1.0."""
    if coeff is not None:
        return float(coeff), f"coefficient {coeff:g} (as asked)"
    if direction.recommended_coeff is not None:
        c = float(direction.recommended_coeff)
        return c, f"coefficient {c:g} (the direction's recommended coefficient, from repe sweep)"
    raise ValueError(
        "--coeff: the direction has no recommended coefficient; pass --coeff (or run `repe sweep` "
        "to get a recommended one)"
    )


def calibrated(lm: LoadedModel, direction: Direction, scale: str) -> Direction:
    """For ``scale="relative"``, the direction with its calibrated residual norms (measured once if it
    does not carry them); unchanged for other scales."""
    if scale == "relative" and not is_calibrated(direction):
        return calibrate(lm, direction)
    return direction
