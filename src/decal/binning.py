"""Equal-mass and equal-width binning of values with a 0/1 target (docs/design.md, "Metrics").

The core that ECE, the maximum calibration error, SCE, MCE and the reliability diagram share;
`decal.metrics` holds the definitions and validates input, this module assumes valid arrays
(values in [0, 1]).

- ``"equal_mass"``: stable-sort by value and split into ``M`` contiguous groups with
  ``numpy.array_split``; when ``n < M`` the extra groups are empty.
- ``"equal_width"``: bins ``[i/M, (i+1)/M)``, the last one closed at 1.0.

Speed matters because the bootstrap calls this thousands of times and users score millions of
predictions. Two exact ways to the per-bin sums:

- `OrderedValues` sorts values and targets together in one int64 key sort. AUROC and AURC need
  that full order anyway, and for one column (the confidence) it is the way to its bins.
- `BucketedValues` (`bucket_columns`: the class columns of SCE and MCE, from `BUCKETED_FROM`
  examples on) sorts nothing but the few examples next to a bin boundary. It counts the values
  into buckets by their leading bits (``numpy.bincount``), which order like the values, and
  expands only the buckets that hold an equal-mass cut or an equal-width edge. It runs at the
  speed of ``bincount`` on every CPU, where the quickselect it replaced depended on the CPU's
  SIMD partition kernel (the suite at 0.41x netcal's ECE on an AMD EPYC with AVX-512, issue
  #20; `benchmarks/bench_metrics.py`). A column whose values crowd into a few buckets (near 1.0
  a bucket is 1/512 wide) would expand most of them; it is sorted instead.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

__all__ = ["BUCKETED_FROM", "BinStats", "BucketedValues", "OrderedValues", "bin_stats", "bucket_columns"]


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


class OrderedValues:
    """A value array (n,) with a 0/1 target (n,), sorted once and shared by several metrics.

    Values and targets are sorted together as int64 keys, ``bits(value) << 1 | target``: the bit
    patterns of non-negative floats order like the floats, and the shift drops only the sign bit
    (so -0.0 sorts as 0.0). A SIMD sort of these keys is about four times faster than
    ``argsort``. Within a run of tied values the wrong (0) targets come first; where such a run
    straddles an equal-mass bin boundary, the definition's stable order (file order) is restored
    from the unsorted arrays (`positives_before`).

    all: values (n,) in that order; t: their targets (n,), booleans; n_pos: the number of true
    targets.
    """

    def __init__(self, values, target):
        self.values = values  # (n,), may be a strided column view
        self.target = target.astype(bool, copy=False)
        key = np.left_shift(values.view(np.int64), 1)  # values are validated to lie in [0, 1]
        key |= self.target
        key.sort()
        self.t = np.empty(len(key), dtype=bool)
        np.bitwise_and(key, 1, out=self.t, casting="unsafe")
        key >>= 1
        self.all = key.view(np.float64)
        self.n_pos = int(np.count_nonzero(self.target))
        self._run_ends = None

    def ranks(self, edges: np.ndarray) -> np.ndarray:
        """How many values are below each edge (M,)."""
        return np.searchsorted(self.all, edges, side="left")

    def bin_sums(self, n_bins: int, binning: str):
        """Counts, value sums, target sums and ranges per bin (M,); see `bin_stats`."""
        return (_equal_mass_sums if binning == "equal_mass" else _equal_width_sums)(self, n_bins)

    @property
    def run_ends(self) -> np.ndarray | None:
        """Exclusive end of each run of tied values in `all` (ascending), or None without ties."""
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
        if len(straddling):
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
    lo = sv.ranks(edges[:-1])
    hi = np.append(lo[1:], len(sv.all))
    count = (hi - lo).astype(np.float64)
    return count, _segment_sums(sv.all, lo, hi), _segment_counts(sv.t, lo, hi), edges[:-1], edges[1:]


# Leading bits that name a bucket: the exponent and the top mantissa bits. With m = 8 a bucket
# spans 1/256 of an octave, so the buckets next to the ~3M cuts and edges of a million class
# probabilities hold about 1 % of them.
_MANTISSA_BITS = 8
_SHIFT = 52 - _MANTISSA_BITS
# Every value below 2**-126 (float32's smallest normal: what a float32 softmax rounds to zero or
# leaves subnormal) shares bucket 0 with 0.0 and -0.0, so a column's buckets span 126 octaves
# only and its tables stay small enough for the cache. 1.0 falls in bucket 126 << m.
_FIRST = (1023 - 126) << _MANTISSA_BITS  # the bucket of 2**-126 among all float64 bit patterns
_BUCKETS = (126 << _MANTISSA_BITS) + 1  # buckets per column
# Below this many values the full key sort is faster than the buckets (`OrderedValues`; five class
# columns of 20,000: 4.4 ms sorted, 5.8 bucketed; of 50,000: 11.3 and 7.0), and the bootstrap's
# resamples (~1,000 examples) take that path.
BUCKETED_FROM = 30_000
# A column with more examples than this share of n in its split buckets is sorted instead: their
# stable argsort costs about five times a key sort per example.
_SORTED_ABOVE = 1 / 8


def _to_buckets(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The buckets of float64 bit patterns (int64 view) of values in [0, 1], into `out`: the
    leading bits counted from 2**-126's, and 0 below (-0.0 included: its only set bit is the sign,
    which the arithmetic shift keeps, so it turns negative)."""
    np.right_shift(bits, _SHIFT, out=out)
    out -= _FIRST
    return np.maximum(out, 0, out=out)


def _buckets(values: np.ndarray) -> np.ndarray:
    """The bucket of every value in [0, 1] (any shape), as int64; non-decreasing in the value."""
    return _to_buckets(values.view(np.int64), np.empty(values.shape, dtype=np.int64))


def _bucket_codes(values: np.ndarray) -> np.ndarray:
    """The bucket of every entry of a C-contiguous (n, K) array in [0, 1], plus column * _BUCKETS so
    that one ``bincount`` counts all columns: int64 (n * K,) in the array's flat order."""
    n_columns = values.shape[1]
    bits = values.reshape(-1).view(np.int64)
    code = np.empty(len(bits), dtype=np.int64)
    # As `_to_buckets`, with the column's offset folded into both steps after the shift: bucket 0
    # of column k is k * _BUCKETS. A block of rows at a time, so the passes run in cache, and
    # against tiled rows of the K offsets (a (K,) row would broadcast with an inner loop of K).
    first = np.tile(np.arange(n_columns, dtype=np.int64) * _BUCKETS, 8192)
    shift = first - _FIRST
    for start in range(0, len(bits), len(first)):
        block = code[start:start + len(first)]
        np.right_shift(bits[start:start + len(first)], _SHIFT, out=block)
        block += shift[: len(block)]
        np.maximum(block, first[: len(block)], out=block)
    return code


def bucket_columns(values, labels, n_bins: int, true_values=None, *,
                   sort_crowded: bool = True) -> list["BucketedValues | OrderedValues"]:
    """Each column k of `values` (n, K) bucketed with the target ``labels == k`` (labels (n,), -1
    where no column is true): SCE's and MCE's class columns, all from one pass over the array.
    With `sort_crowded`, a column crowded into a few buckets comes back sorted (`OrderedValues`;
    module docstring).

    `true_values`: ``values[i, labels[i]]`` (every row has a label then), where the caller has
    them already (the gold probabilities of NLL and Brier).
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    n, n_columns = values.shape
    flat_values = values.reshape(-1)
    code = _bucket_codes(values)
    size = n_columns * _BUCKETS
    count = np.bincount(code, minlength=size)
    value_sum = np.bincount(code, weights=flat_values, minlength=size)
    rows = None if true_values is not None or labels.min() >= 0 else np.flatnonzero(labels >= 0)
    row_labels = labels if rows is None else labels[rows]
    if true_values is None:
        true_values = flat_values[(np.arange(n) if rows is None else rows) * n_columns + row_labels]
    true_codes = _buckets(true_values)
    true_codes += row_labels * _BUCKETS
    target_sum = np.bincount(true_codes, minlength=size)
    tables = [(count[k * _BUCKETS:(k + 1) * _BUCKETS], value_sum[k * _BUCKETS:(k + 1) * _BUCKETS],
               target_sum[k * _BUCKETS:(k + 1) * _BUCKETS]) for k in range(n_columns)]
    nonempty = [np.flatnonzero(c) for c, _, _ in tables]
    split = np.zeros(size, dtype=bool)
    for k, (c, _, _) in enumerate(tables):
        split[k * _BUCKETS + _split_buckets(c, nonempty[k], n, n_bins)] = True
    members = np.flatnonzero(split[code])  # flat order: file order within each column
    # One ascending gather each (the members are ~1 % of the entries, each a cache miss).
    member_values = flat_values[members]
    member_labels = labels[members // n_columns] if n_columns > 1 else labels[members]
    member_column = members % n_columns
    crowded = (np.bincount(member_column, minlength=n_columns) > _SORTED_ABOVE * n) & sort_crowded
    columns = []
    for k, (c, v, t) in enumerate(tables):
        if crowded[k]:
            columns.append(OrderedValues(values[:, k], labels == k))
            continue
        mine = member_column == k
        columns.append(BucketedValues._from_tables(
            n, n_bins, c, v, t, split[k * _BUCKETS:(k + 1) * _BUCKETS], nonempty[k],
            member_values[mine], member_labels[mine] == k,
        ))
    return columns


def _split_buckets(count: np.ndarray, nonempty: np.ndarray, n: int, n_bins: int) -> np.ndarray:
    """The buckets that hold an equal-mass cut (the example of rank ``start`` or ``end - 1`` of a
    bin) or an interior equal-width edge ``i / M``, given the count per bucket and the nonempty ones."""
    starts, ends = _equal_mass_bounds(n, n_bins)
    ranks = np.concatenate([starts, ends - 1])
    cut = nonempty[np.searchsorted(np.cumsum(count[nonempty]), ranks[(ranks >= 0) & (ranks < n)], side="right")]
    return np.concatenate([cut, _buckets(_edges(n_bins)[1:-1])])


class BucketedValues:
    """A value array (n,) with a 0/1 target (n,), binned for one number of bins without a sort.

    The bucket of a value is its leading bits (`_MANTISSA_BITS`), which are non-decreasing in the
    value. One ``bincount`` pass gives each bucket's count, value sum and target sum. A bucket
    that holds an equal-mass cut or an equal-width edge is split: its examples are sorted by
    value, stably, so ties keep file order as the definition says. The others stay whole: all
    the examples of a whole bucket fall in the same bin of either binning.

    The result is a sequence of units in value order, each a whole bucket or one example of a
    split bucket, with a count, a value sum, a target sum and a key (the example's value, or the
    smallest value a whole bucket can hold). Every bin of either binning is a contiguous run of
    units, so its sums are segment sums, as with `OrderedValues`.

    count, value_sum, target_sum, key: per unit (U,); split_examples: the examples in split buckets.
    """

    def __init__(self, values, target, n_bins: int):
        # One column of `bucket_columns`, whose target is true where labels == 0, however crowded.
        values = np.asarray(values, dtype=np.float64).reshape(-1, 1)
        labels = np.asarray(target).astype(np.int64) - 1
        (column,) = bucket_columns(values, labels, n_bins, sort_crowded=False)
        self.__dict__.update(column.__dict__)

    @classmethod
    def _from_tables(cls, n, n_bins, count, value_sum, target_sum, split, nonempty, member_values, member_targets):
        """The units of one column from its bucket tables (_BUCKETS,), its nonempty buckets, and the
        values and targets of the examples in its split buckets, in file order."""
        self = cls.__new__(cls)
        self.n, self.n_bins, self.split_examples = n, n_bins, len(member_values)
        order = np.argsort(member_values, kind="stable")
        member_values, member_targets = member_values[order], member_targets[order]
        member_buckets = _buckets(member_values)
        whole = nonempty[~split[nonempty]]
        # Merge by bucket: each unit lands after the other kind's units of lower buckets (a
        # bucket is never both whole and split).
        at_whole = np.arange(len(whole)) + np.searchsorted(member_buckets, whole)
        at_member = np.arange(len(member_values)) + np.searchsorted(whole, member_buckets)
        units = len(whole) + len(member_values)
        self.count, self.value_sum, self.target_sum, self.key = (np.empty(units) for _ in range(4))
        self.count[at_whole], self.count[at_member] = count[whole], 1.0
        self.value_sum[at_whole], self.value_sum[at_member] = value_sum[whole], member_values
        self.target_sum[at_whole], self.target_sum[at_member] = target_sum[whole], member_targets
        self.key[at_whole] = _smallest_value(whole)
        self.key[at_member] = member_values
        return self

    def bin_sums(self, n_bins: int, binning: str):
        """Counts, value sums, target sums and ranges per bin (M,); see `bin_stats`."""
        if n_bins != self.n_bins:
            raise ValueError(f"bucketed for {self.n_bins} bins, asked for {n_bins}")
        if binning == "equal_mass":
            starts, ends = _equal_mass_bounds(self.n, n_bins)
            before = np.concatenate([[0.0], np.cumsum(self.count)])  # examples before each unit (exact integers)
            lo, hi = np.searchsorted(before, starts), np.searchsorted(before, ends)
            nonempty = hi > lo
            lower, upper = np.full(n_bins, np.nan), np.full(n_bins, np.nan)
            lower[nonempty], upper[nonempty] = self.key[lo[nonempty]], self.key[hi[nonempty] - 1]
        else:
            edges = _edges(n_bins)
            lo = np.searchsorted(self.key, edges[:-1], side="left")
            hi = np.append(lo[1:], len(self.key))
            lower, upper = edges[:-1], edges[1:]
        count = _segment_sums(self.count, lo, hi)
        return count, _segment_sums(self.value_sum, lo, hi), _segment_sums(self.target_sum, lo, hi), lower, upper


def _smallest_value(bucket: np.ndarray) -> np.ndarray:
    """The smallest value each bucket can hold (0.0 for bucket 0), so a whole bucket sorts before
    every value of a higher bucket and after every value of a lower one."""
    return np.where(bucket > 0, ((bucket + _FIRST) << _SHIFT).view(np.float64), 0.0)


def bin_stats(values, target, n_bins: int, binning: str, ordered: OrderedValues | BucketedValues | None = None) -> BinStats:
    """Bin `values` (n,) with a 0/1 `target` (n,); arrays of shape (M,).

    `ordered` reuses the ordering (or bucketing) of the same values and target.
    """
    sv = ordered if ordered is not None else OrderedValues(values, target)
    count, sum_v, sum_t, lower, upper = sv.bin_sums(n_bins, binning)
    nonempty = count > 0
    safe = np.where(nonempty, count, 1.0)
    conf = np.where(nonempty, sum_v / safe, np.nan)
    acc = np.where(nonempty, sum_t / safe, np.nan)
    return BinStats(count=count, conf=conf, acc=acc, lower=np.asarray(lower), upper=np.asarray(upper))
