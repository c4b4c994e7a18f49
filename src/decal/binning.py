"""Equal-mass and equal-width binning of values with a 0/1 target (docs/design.md, "Metrics").

The core that ECE, the maximum calibration error, SCE, MCE and the reliability diagram share;
`decal.metrics` holds the definitions and validates input, this module assumes valid arrays.

- ``"equal_mass"``: stable-sort by value and split into ``M`` contiguous groups with
  ``numpy.array_split``; when ``n < M`` the extra groups are empty.
- ``"equal_width"``: bins ``[i/M, (i+1)/M)``, the last one closed at 1.0.

Speed matters because the bootstrap calls this thousands of times and users score millions of
predictions: `OrderedValues` orders values and targets in one int64 sort (or, where only bins
are needed, a partial quickselect), and per-bin sums are read off contiguous segments.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

__all__ = ["BinStats", "OrderedValues", "bin_stats", "partition_bins"]


@dataclass(frozen=True)
class BinStats:
    """Per-bin statistics of one binning (arrays of shape (M,); nan where a bin is empty).

    count: examples per bin; conf: mean value (confidence); acc: mean target (accuracy);
    lower/upper: the bin's range -- the fixed edges for equal width, the smallest and largest
    value in the bin for equal mass.
    """

    count: np.ndarray
    conf: np.ndarray
    acc: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    @property
    def gap(self) -> np.ndarray:
        """``acc - conf`` per bin (negative = overconfident)."""
        return self.acc - self.conf


def _equal_mass_bounds(n: int, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of each equal-mass bin: numpy.array_split's sizes, the first
    n % M groups one larger."""
    sizes = np.full(n_bins, n // n_bins, dtype=np.int64)
    sizes[: n % n_bins] += 1
    ends = np.cumsum(sizes)
    return ends - sizes, ends


def _partition_at(key: np.ndarray, positions, fixed: list[int]) -> None:
    """Quickselect `key` in place until each position p in `positions` holds the p-th smallest
    key with no larger key before it and no smaller one after it.

    `fixed` lists (ascending) the positions that already hold, and is updated. Positions are
    taken median first, so each partition works on the part between two fixed neighbours and
    the total work is O(n log(#positions)), against the sort's O(n log n).
    """
    todo = sorted(set(positions).difference(fixed))
    stack = [(0, len(todo))]
    while stack:
        i, j = stack.pop()
        if i >= j:
            continue
        m = (i + j) // 2
        p = todo[m]
        k = bisect.bisect_left(fixed, p)
        a = fixed[k - 1] + 1 if k > 0 else 0
        b = fixed[k] if k < len(fixed) else len(key)
        key[a:b].partition(p - a)
        fixed.insert(k, p)
        stack += [(i, m), (m + 1, j)]


class OrderedValues:
    """A value array (n,) with a 0/1 target (n,), ordered once and shared by several metrics.

    Values and targets are ordered together as int64 keys, ``bits(value) << 1 | target``: the bit
    patterns of non-negative floats order like the floats, and the shift drops only the sign bit
    (so -0.0 sorts as 0.0). A SIMD sort of these keys is about four times faster than
    ``argsort``. Within a run of tied values the wrong (0) targets come first; where such a run
    straddles an equal-mass bin boundary, the definition's stable order (file order) is restored
    from the unsorted arrays (`positives_before`).

    Without `n_bins` the keys are sorted (AUROC and AURC need every rank). With `n_bins` they
    are only partitioned, about three times faster: just enough that every equal-mass and
    equal-width bin of `n_bins` bins is a contiguous segment holding exactly its examples, with
    each equal-mass bin's smallest and largest value at its first and last position. SCE and
    MCE need nothing more.

    all: values (n,) in that order; t: their targets (n,), booleans; n_pos: the number of true
    targets; is_sorted: whether `all` is fully sorted.
    """

    def __init__(self, values, target, buffers=None, n_bins: int | None = None):
        """`buffers`: an int64 and a bool array of shape (n,) to order into, so a loop over class
        columns reuses two allocations (each new 8 MB array costs page faults); the `OrderedValues`
        then lives in them until the next one overwrites it."""
        n = len(values)
        self.values = values  # (n,), may be a strided column view
        self.target = target.astype(bool, copy=False)
        key, self.t = buffers if buffers is not None else (np.empty(n, np.int64), np.empty(n, bool))
        np.left_shift(values.view(np.int64), 1, out=key)  # values are validated to lie in [0, 1]
        key |= self.target
        self.is_sorted = n_bins is None
        self._edge_ranks = None
        if n_bins is None:
            key.sort()
        else:
            starts, ends = _equal_mass_bounds(n, n_bins)
            fixed: list[int] = []
            _partition_at(key, [int(p) for p in np.concatenate([starts, ends - 1]) if 0 <= p < n], fixed)
            self._edge_ranks = (n_bins, self._ranks_by_scan(key, fixed, _edges(n_bins)[:-1]))
            _partition_at(key, [int(r) for r in self._edge_ranks[1] if 0 < r < n], fixed)
        np.bitwise_and(key, 1, out=self.t, casting="unsafe")
        key >>= 1
        self.all = key.view(np.float64)
        self.n_pos = int(np.count_nonzero(self.target))
        self._run_ends = None

    @staticmethod
    def _ranks_by_scan(key: np.ndarray, fixed: list[int], edges: np.ndarray) -> np.ndarray:
        """How many values are below each edge, in partitioned keys: the edge's key falls between
        two fixed positions, and only the part between them is scanned."""
        fixed_keys = key[fixed]
        ranks = np.empty(len(edges), dtype=np.int64)
        for i, edge_key in enumerate(np.left_shift(edges.view(np.int64), 1).tolist()):
            k = int(np.searchsorted(fixed_keys, edge_key, side="left"))  # fixed keys before k are < edge
            a = fixed[k - 1] + 1 if k > 0 else 0
            b = fixed[k] if k < len(fixed) else len(key)
            ranks[i] = a + np.count_nonzero(key[a:b] < edge_key)
        return ranks

    def ranks(self, edges: np.ndarray, n_bins: int) -> np.ndarray:
        """How many values are below each of the equal-width edges ``i / n_bins`` (M,)."""
        if self.is_sorted:
            return np.searchsorted(self.all, edges, side="left")
        if self._edge_ranks[0] != n_bins:
            raise ValueError(f"ordered for {self._edge_ranks[0]} bins, asked for {n_bins}")
        return self._edge_ranks[1]

    @property
    def run_ends(self) -> np.ndarray | None:
        """Exclusive end of each run of tied values in `all` (ascending), or None without ties."""
        assert self.is_sorted, "tie runs need the full sort"
        if self._run_ends is None:
            new_value = self.all[1:] != self.all[:-1]
            self._run_ends = np.empty(0, np.int64) if new_value.all() else np.append(np.flatnonzero(new_value) + 1, len(self.all))
        return self._run_ends if len(self._run_ends) else None

    def positives_before(self, ends: np.ndarray) -> np.ndarray:
        """Positives among the first `e` examples of the stable sort, for each equal-mass bin end `e`."""
        n = len(self.all)
        e = np.clip(ends, 0, n)
        inner = np.flatnonzero((e > 0) & (e < n))
        counts = np.zeros(len(e), dtype=np.float64)
        counts[e >= n] = self.n_pos
        if len(inner):
            hi = e[inner]
            counts[inner] = np.cumsum(_segment_counts(self.t, np.concatenate([[0], hi[:-1]]), hi))
        straddling = inner[self.all[e[inner] - 1] == self.all[e[inner]]]
        if len(straddling) and self.is_sorted:
            # A run whose targets are all equal (a bootstrap's repeated example) needs no fix.
            thr = self.all[e[straddling] - 1]
            left, right = np.searchsorted(self.all, thr, side="left"), np.searchsorted(self.all, thr, side="right")
            straddling = straddling[self.t[left] != self.t[right - 1]]
        for j in straddling:
            # A tie run straddles the boundary: the key order put its wrong examples first, the
            # stable sort takes the run's first examples in file order. Rare; whole-array passes.
            thr = self.all[e[j] - 1]
            tied = np.flatnonzero(self.values == thr)
            taken = int(e[j]) - int(np.count_nonzero(self.values < thr))
            n_wrong_tied = len(tied) - int(np.count_nonzero(self.target[tied]))
            by_key = max(0, taken - n_wrong_tied)
            by_file = int(np.count_nonzero(self.target[tied[:taken]]))
            counts[j] += by_file - by_key
        return counts


def partition_bins(n: int, n_bins: int) -> int | None:
    """`n_bins` where partitioning beats sorting, else None (sort). Below ~20,000 examples the
    Python loop over the cut positions costs more than the whole sort; the results are equal."""
    return n_bins if n >= 20_000 else None


def _edges(n_bins: int) -> np.ndarray:
    """The equal-width bin edges ``i / M``, i = 0..M (M + 1,)."""
    return np.arange(n_bins + 1, dtype=np.float64) / n_bins


def _segment_sums(arr: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``arr[lo[i]:hi[i]].sum()`` (float64) for contiguous, ascending segments (``hi[i] <= lo[i + 1]``)."""
    out = np.zeros(len(lo))
    nonempty = np.flatnonzero(hi > lo)
    if len(nonempty):
        # reduceat sums from each start to the next start; empty segments between nonempty ones
        # have zero width, and the last nonempty segment runs to hi[-1], so cut the array there.
        out[nonempty] = np.add.reduceat(arr[: hi[nonempty[-1]]], lo[nonempty])
    return out


def _segment_counts(flags: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``count_nonzero(flags[lo[i]:hi[i]])`` as float64; a loop over bins, each a SIMD byte count
    (reduceat on booleans would cast every element to an integer first)."""
    return np.array([np.count_nonzero(flags[a:b]) for a, b in zip(lo.tolist(), hi.tolist())], dtype=np.float64)


def _equal_mass_sums(sv: OrderedValues, n_bins: int):
    """Counts, value sums, target sums and ranges per equal-mass bin; see `bin_stats`."""
    starts, ends = _equal_mass_bounds(len(sv.all), n_bins)
    sizes = ends - starts
    cum_t = np.concatenate([[0.0], sv.positives_before(ends)])
    nonempty = sizes > 0
    lower = np.full(n_bins, np.nan)
    upper = np.full(n_bins, np.nan)
    lower[nonempty] = sv.all[starts[nonempty]]
    upper[nonempty] = sv.all[ends[nonempty] - 1]
    return sizes.astype(np.float64), _segment_sums(sv.all, starts, ends), np.diff(cum_t), lower, upper


def _equal_width_sums(sv: OrderedValues, n_bins: int):
    """Counts, value sums, target sums and edges per equal-width bin; see `bin_stats`.

    Bin i holds the values in ``[i/M, (i+1)/M)``: it starts after the values below i/M, and
    the last bin runs to the end, so 1.0 lands in it. Tied values all fall in one bin, so the
    order inside a tie run does not matter here.
    """
    edges = _edges(n_bins)
    lo = sv.ranks(edges[:-1], n_bins)
    hi = np.append(lo[1:], len(sv.all))
    count = (hi - lo).astype(np.float64)
    return count, _segment_sums(sv.all, lo, hi), _segment_counts(sv.t, lo, hi), edges[:-1], edges[1:]


def bin_stats(values, target, n_bins: int, binning: str, ordered: OrderedValues | None = None) -> BinStats:
    """Bin `values` (n,) with a 0/1 `target` (n,); arrays of shape (M,).

    `ordered` reuses the ordering of the same values and target.
    """
    sv = ordered if ordered is not None else OrderedValues(values, target, n_bins=partition_bins(len(values), n_bins))
    sums = _equal_mass_sums if binning == "equal_mass" else _equal_width_sums
    count, sum_v, sum_t, lower, upper = sums(sv, n_bins)
    nonempty = count > 0
    safe = np.where(nonempty, count, 1.0)
    conf = np.where(nonempty, sum_v / safe, np.nan)
    acc = np.where(nonempty, sum_t / safe, np.nan)
    return BinStats(count=count, conf=conf, acc=acc, lower=np.asarray(lower), upper=np.asarray(upper))
