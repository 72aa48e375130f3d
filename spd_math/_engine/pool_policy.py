"""When the scalable merge state rebuilds its candidate pool, and what a new pool covers.

The range sampler's candidates come from the pool (`pool.CandidatePool`) of `state.GroupState`. The state
evaluates costs; this policy decides, from numbers the state hands it: whether the pool in hand still answers
a cutoff, which floor and level a new pool gets, whether a build grew too large, and, after builds that did,
how many choices count their candidates row by row before a pool is built again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PoolSettings:
    """The thresholds of the pool's rebuild policy.

    Attributes
    ----------
    share : float
        Share of the cost range above the minimum that a pool built while looking for the minimum covers.
    floor_share : float
        Share of the range sampler's look-ahead below the cutoff down to which a pool holds pairs that its
        ceilings would count (the rest are counted by ceiling): room for the cutoff to fall a little without
        a rebuild.
    band_per_group : int
        Pairs with a ceiling between a pool's floor and its level (all in the pool) per live group, at most
        (and at least `band_min` in all): the level comes down where ceilings crowd, found in
        `level_bisections` bisection steps.
    band_min : int
    level_bisections : int
    limit : int
        Pool entries beyond which the range sampler counts candidates row by row instead.
    retry_cap : int
        After a pool overflowed, the range sampler counts row by row for this many choices (doubling per
        overflow in a row, up to the cap) before it tries to build a pool again: a failed build costs a pass
        over the rows.
    """

    share: float = 0.06
    floor_share: float = 0.02
    band_per_group: int = 4
    band_min: int = 1 << 16
    level_bisections: int = 12
    limit: int = 1 << 25
    retry_cap: int = 64


# What a new policy uses unless given others (read when the policy is made).
DEFAULT_SETTINGS = PoolSettings()


class PoolPolicy:
    """The pool's rebuild decisions for one merge run, with the count of overflowed builds they depend on.

    Examples
    --------
    >>> policy = PoolPolicy(PoolSettings(limit=10))
    >>> policy.answers(cutoff=1.0, level=2.0, floor=-math.inf), policy.answers(cutoff=3.0, level=2.0, floor=0.0)
    (True, False)
    >>> policy.too_large(11), policy.level_after_overflow(level=2.0, cutoff=1.0)
    (True, 1.0)
    >>> policy.built(overflowed=True); policy.built(overflowed=True)
    >>> [policy.counts_rows_instead() for _ in range(4)]
    [True, True, True, False]
    """

    def __init__(self, settings: PoolSettings | None = None) -> None:
        self.settings = DEFAULT_SETTINGS if settings is None else settings
        self.overflows = 0  # pool builds in a row that overflowed `settings.limit`
        self.wait = 0  # range choices left to count row by row before building a pool again

    def answers(self, cutoff: float, level: float, floor: float) -> bool:
        """Whether a pool of this `level` (at the current L) and `floor` holds every candidate at `cutoff` that
        the ceilings do not count."""
        return not (cutoff > level or cutoff < floor)

    def counts_rows_instead(self) -> bool:
        """Whether this choice counts its candidates row by row instead of building a pool (while overflowed
        builds are waited out); it uses up one such choice."""
        if self.wait > 0:
            self.wait -= 1
            return True
        return False

    def built(self, overflowed: bool) -> None:
        """Record a pool build for a cutoff: after n overflowed ones in a row, wait 2**n - 1 choices (up to the cap)."""
        self.overflows = self.overflows + 1 if overflowed else 0
        self.wait = min(self.settings.retry_cap, 2**self.overflows - 1) if overflowed else 0

    def builds_for_minimum(self, has_pool: bool) -> bool:
        """Whether the search for the minimum cost may build a pool: none stands and no overflow is waited out."""
        return not (self.wait > 0 or has_pool)

    def minimum_level(self, upper: float, highest: float) -> float:
        """The level of a pool built for the minimum, from an upper bound of the minimum and the maximum cost."""
        return upper + self.settings.share * (highest - upper)

    def bounds(self, cutoff: float, slack: float, k: int,
               under: Callable[[float], int] | None) -> tuple[float, float]:
        """`(floor, level)` of a new pool for `cutoff`: up to `slack` above it, and a little under it.

        `under(value)` counts the (ordered) pairs of the k live groups with a ceiling `<= value`; None where
        ceilings bound no cost (continuous mode). Every pair with a ceiling in (floor, level] belongs in the
        pool whatever its coactivation; where ceilings crowd (most pairs of rare groups share a few small
        counts) the level is lowered until at most `band_per_group · k` of them are, and the floor raised to
        the cutoff.
        """
        if under is None:
            return -math.inf, cutoff + slack
        settings = self.settings
        budget = max(settings.band_min, settings.band_per_group * k)
        floor = cutoff - settings.floor_share * slack
        below, at_cutoff = under(floor), under(cutoff)
        if at_cutoff - below > budget // 4:
            floor, below = cutoff, at_cutoff
        level = cutoff + slack
        if under(level) - below > budget:
            low, high = cutoff, level
            for _ in range(settings.level_bisections):
                middle = (low + high) / 2
                low, high = (middle, high) if under(middle) - below <= budget else (low, middle)
            level = low
        return (floor if below else -math.inf), level

    def too_large(self, entries: int) -> bool:
        """Whether a pool being built with this many entries has overflowed."""
        return entries > self.settings.limit

    def level_after_overflow(self, level: float, cutoff: float) -> float | None:
        """The level to build again at after a build at `level` overflowed (the cutoff itself), or None: no pool."""
        return cutoff if level > cutoff else None
