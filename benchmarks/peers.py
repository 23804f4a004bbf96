"""The pure logic of benchmarks/gradients.py's peer rows (standard library only, so it runs in any venv).

- ``parse_configs``: a peer's configurations from ``--bergson-configs`` / ``--dattri-configs`` text,
  ``target:batching`` items (``global:tokens``, ``per_module:8``, ``dense:16``);
- ``timing``: the min and median of a row's repeated timings;
- ``fixed_cost``: a least-squares fit ``seconds = fixed + per_token * padded_tokens`` over a row's batches,
  whose intercept is the row's fixed cost per batch (bergson's global projection matrix, regenerated for
  every batch, shows up there);
- ``pick_reference``: the peer configuration a like-for-like ratio is taken against: the fastest whose
  Spearman is within ``tolerance`` of ours (or better);
- ``last_line``: the ``key=value`` summary line.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

TOLERANCE = 0.02  # Spearman: a peer configuration within this of ours counts as equal agreement


@dataclass(frozen=True)
class Config:
    """One configuration of a peer: its projection ``target`` and its ``batching`` ("tokens" or a batch size)."""

    target: str
    batching: str

    @property
    def batch_size(self) -> int | None:
        return None if self.batching == "tokens" else int(self.batching)

    @property
    def name(self) -> str:
        return f"{self.target}/{'tokens' if self.batch_size is None else f'b{self.batch_size}'}"


def parse_configs(text: str, targets: tuple[str, ...]) -> list[Config]:
    """``"global:tokens,per_module:8"`` -> configurations, in order, without repeats.

    ``batching`` is ``tokens`` (the peer's own token-budget batching) or a positive batch size; a target
    not in ``targets`` or any other batching is refused with the offending item named.
    """
    configs: list[Config] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, sep, batching = item.partition(":")
        if not sep or target not in targets:
            raise ValueError(f"{item!r}: expected TARGET:BATCHING with TARGET one of {', '.join(targets)}")
        if batching != "tokens" and not (batching.isdigit() and int(batching) > 0):
            raise ValueError(f"{item!r}: BATCHING is 'tokens' or a positive batch size")
        config = Config(target, batching if batching == "tokens" else str(int(batching)))
        if config not in configs:
            configs.append(config)
    if not configs:
        raise ValueError(f"no configuration in {text!r}")
    return configs


def token_batches(lengths: list[int], budget: int, cap: int | None = None) -> list[list[int]]:
    """bergson's bin-packing (bergson/data.py:260-307, one worker): longest first, a batch grows while its
    longest length times its size stays within ``budget`` and its size within ``cap``; examples shorter than
    2 tokens are left out. For estimates here; bergson_row.py runs bergson's own ``allocate_batches``."""
    order = sorted((i for i, n in enumerate(lengths) if n >= 2), key=lambda i: -lengths[i])
    if order and lengths[order[0]] > budget:
        raise ValueError(f"an example of {lengths[order[0]]} tokens does not fit a token budget of {budget}")
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if current and lengths[current[0]] * (len(current) + 1) <= budget and (cap is None or len(current) < cap):
            current.append(i)
        else:
            batches.append([i])
    return batches


def timing(seconds: list[float]) -> tuple[float, float]:
    """(min, median) of a row's repeated timings."""
    if not seconds:
        raise ValueError("no timings")
    return min(seconds), statistics.median(seconds)


def fixed_cost(tokens: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``seconds = fixed + per_token * tokens`` over batches: ``(fixed, per_token)``.

    NaNs when the batches do not determine a line (fewer than two distinct token counts).
    """
    if len(tokens) != len(seconds):
        raise ValueError(f"{len(tokens)} token counts for {len(seconds)} timings")
    if len(set(tokens)) < 2:
        return math.nan, math.nan
    mean_x, mean_y = statistics.fmean(tokens), statistics.fmean(seconds)
    sxx = sum((x - mean_x) ** 2 for x in tokens)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(tokens, seconds)) / sxx
    return mean_y - slope * mean_x, slope


def pick_reference(
    rates: dict[str, float], spearman: dict[str, float], ours: float | None, tolerance: float = TOLERANCE
) -> tuple[str, str]:
    """The configuration a like-for-like ratio is taken against, and why it was picked.

    ``rates``: samples/s per configuration; ``spearman``: its agreement with its exact target (missing
    when not measured); ``ours``: our row's. Returns ``(name, status)``:

    - ``qualified``: the fastest configuration whose Spearman is at least ``ours - tolerance``;
    - ``none-qualified``: none is; the one with the highest Spearman (the closest in agreement);
    - ``unmeasured``: agreement is missing for us or for a configuration: the fastest of all, so that
      ``ours / its rate`` is a lower bound on the like-for-like ratio (the qualified ones are a subset).
    """
    if not rates:
        raise ValueError("no peer configuration to compare with")
    fastest = max(rates, key=lambda name: rates[name])
    if ours is None or math.isnan(ours) or any(math.isnan(spearman.get(name, math.nan)) for name in rates):
        return fastest, "unmeasured"
    qualified = [name for name in rates if spearman[name] >= ours - tolerance]
    if qualified:
        return max(qualified, key=lambda name: rates[name]), "qualified"
    return max(rates, key=lambda name: (spearman[name], rates[name])), "none-qualified"


def ratio(ours: float | None, theirs: float | None) -> float:
    """ours / theirs, NaN when either is missing or theirs is not positive."""
    if ours is None or theirs is None or math.isnan(ours) or math.isnan(theirs) or theirs <= 0:
        return math.nan
    return ours / theirs


def last_line(values: dict[str, float | str]) -> str:
    """``key=value`` pairs in the given order: numbers with three significant decimals (six for cosines)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, str):
            parts.append(f"{key}={value}")
        elif key.startswith("cosine"):
            parts.append(f"{key}={value:.6f}")
        elif key.startswith("floor"):
            parts.append(f"{key}={value:.3f}")
        else:
            parts.append(f"{key}={value:.2f}")
    return " ".join(parts)
