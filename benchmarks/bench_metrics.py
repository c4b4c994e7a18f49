"""Time decal's full metric suite on 1,000,000 predictions with 5 classes, against netcal's ECE.

Prints one line per measurement and the ratios. Targets (issue #4): the whole suite under 2 s
and faster than netcal's ECE alone on the same data; a 1,000-resample bootstrap of every metric
on a paper-sized evaluation (1,180 records) in a few seconds.

    .venv/bin/python benchmarks/bench_metrics.py [--n 1000000] [--classes 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def _data(n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 3.0
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    # Labels drawn from a tempered distribution: an overconfident model.
    tempered = np.exp(logits / 3.0)
    tempered /= tempered.sum(1, keepdims=True)
    labels = (rng.random(n)[:, None] > np.cumsum(tempered, axis=1)).sum(1).clip(0, k - 1)
    return probs, labels


# CPU time of this process, not wall time: on a shared machine other jobs stretch wall time
# for both sides unevenly, while CPU time measures the work done (numpy here is single-threaded).
_clock = time.process_time


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = _clock()
        fn()
        times.append(_clock() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, metavar="N")
    parser.add_argument("--classes", type=int, default=5, metavar="K")
    parser.add_argument("--repeats", type=int, default=3, metavar="R")
    parser.add_argument("--wall", action="store_true", help="Measure wall-clock time instead of CPU time.")
    args = parser.parse_args()
    if args.wall:
        global _clock
        _clock = time.perf_counter
    print(f"timing: {'wall-clock' if args.wall else 'process CPU'} time, best of {args.repeats}")

    from decal import metrics
    from decal.records import RecordArrays

    probs, labels = _data(args.n, args.classes)
    pred = probs.argmax(1)
    arrays = RecordArrays(
        confidence=probs.max(1), correct=pred == labels, valid=np.ones(args.n, bool), option_probs=probs,
        class_probs=probs, label_index=labels, prediction_index=pred, labels=tuple(map(str, range(args.classes))),
    )
    suite = _best(lambda: metrics.summarize(arrays), args.repeats)
    ece_only = _best(lambda: metrics.ece(arrays.confidence, arrays.correct), args.repeats)
    print(f"decal full suite ({len(metrics.SUMMARY_KEYS) - 1} metrics, validation included), n={args.n:,}, K={args.classes}: {suite:.3f} s")
    print(f"decal ECE alone (equal mass):                                      {ece_only:.3f} s")
    try:
        from netcal.metrics import ECE
    except ImportError:
        print("netcal not installed (pip install -e '.[bench]'): no ratio")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            netcal = _best(lambda: ECE(bins=10).measure(probs, labels), args.repeats)
            theirs = ECE(bins=10).measure(probs, labels)
        ours = metrics.ece(arrays.confidence, arrays.correct, binning="equal_width")
        print(f"netcal ECE alone (equal width, same data):                         {netcal:.3f} s")
        print(f"ratio netcal ECE / decal full suite: {netcal / suite:.2f}x   (>1: the whole suite is faster)")
        print(f"ratio netcal ECE / decal ECE:        {netcal / ece_only:.2f}x")
        print(f"agreement: decal equal-width ECE {ours:.6f}, netcal {theirs:.6f}")
        print(f"target: full suite faster than netcal's ECE alone -> {'met' if suite < netcal else 'NOT met'}")
    print(f"target: full suite under 2 s -> {'met' if suite < 2.0 else 'NOT met'}")

    # The experiment runner's case: every metric with a 1,000-resample bootstrap on 1,180 records.
    small = RecordArrays(*(getattr(arrays, f)[:1180] if f != "labels" else arrays.labels for f in RecordArrays.__dataclass_fields__))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boot = _best(lambda: metrics.metrics_report(small, n_resamples=1000), 1)
    print(f"metrics_report with 1,000 bootstrap resamples, n=1,180: {boot:.2f} s")


if __name__ == "__main__":
    main()
