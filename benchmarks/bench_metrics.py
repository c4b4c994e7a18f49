"""Time decal's full metric suite on 1,000,000 predictions with 5 classes, against netcal's ECE.

Prints one line per measurement and the ratios. Targets (issues #4 and #20): the whole suite under
2 s and faster than netcal's ECE alone on the same data, measured in this process; a 1,000-resample
bootstrap of every metric on a paper-sized evaluation (1,180 records) in a few seconds.

    .venv/bin/python benchmarks/bench_metrics.py [--n 1000000] [--classes 5] [--repeats 3]
        [--resamples 1000] [--bootstrap-n 1180] [--wall]

The test suite runs it at a tiny size (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings

import numpy as np

__all__ = ["main"]


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


def _best(fn, repeats: int, clock) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def _first(arrays, n: int):
    """The first `n` records of a `RecordArrays`: every array field sliced, the rest (labels, a
    missing `true_probs`) kept."""
    return dataclasses.replace(arrays, **{
        f.name: value[:n] for f in dataclasses.fields(arrays) if isinstance(value := getattr(arrays, f.name), np.ndarray)
    })


def _against_netcal(probs, labels, arrays, suite: float, ece_only: float, repeats: int, clock) -> None:
    from decal import metrics

    try:
        from netcal.metrics import ECE
    except ImportError:
        print("netcal not installed (pip install -e '.[bench]'): no ratio")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        netcal = _best(lambda: ECE(bins=10).measure(probs, labels), repeats, clock)
        theirs = ECE(bins=10).measure(probs, labels)
    ours = metrics.ece(arrays.confidence, arrays.correct, binning="equal_width")
    print(f"netcal ECE alone (equal width, same data):                         {netcal:.3f} s")
    print(f"ratio netcal ECE / decal full suite: {netcal / suite:.2f}x   (>1: the whole suite is faster)")
    print(f"ratio netcal ECE / decal ECE:        {netcal / ece_only:.2f}x")
    print(f"agreement: decal equal-width ECE {ours:.6f}, netcal {theirs:.6f}")
    print(f"target: full suite faster than netcal's ECE alone -> {'met' if suite < netcal else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, metavar="N")
    parser.add_argument("--classes", type=int, default=5, metavar="K")
    parser.add_argument("--repeats", type=int, default=3, metavar="R")
    parser.add_argument("--resamples", type=int, default=1000, metavar="B", help="bootstrap resamples of the last line")
    parser.add_argument("--bootstrap-n", type=int, default=1180, metavar="N", help="records of the bootstrap line")
    parser.add_argument("--wall", action="store_true", help="Measure wall-clock time instead of CPU time.")
    args = parser.parse_args(argv)
    # CPU time of this process, not wall time: on a shared machine other jobs stretch wall time
    # for both sides unevenly, while CPU time measures the work done (numpy here is single-threaded).
    clock = time.perf_counter if args.wall else time.process_time
    print(f"timing: {'wall-clock' if args.wall else 'process CPU'} time, best of {args.repeats}")

    from decal import metrics
    from decal.records import RecordArrays

    probs, labels = _data(args.n, args.classes)
    pred = probs.argmax(1)
    arrays = RecordArrays(
        confidence=probs.max(1), correct=pred == labels, valid=np.ones(args.n, bool), option_probs=probs,
        class_probs=probs, label_index=labels, prediction_index=pred, labels=tuple(map(str, range(args.classes))),
    )
    suite = _best(lambda: metrics.summarize(arrays), args.repeats, clock)
    print(f"decal full suite ({len(metrics.SUMMARY_KEYS) - 1} metrics, validation included), n={args.n:,}, "
          f"K={args.classes}: {suite:.3f} s")
    ece_only = _best(lambda: metrics.ece(arrays.confidence, arrays.correct), args.repeats, clock)
    print(f"decal ECE alone (equal mass):                                      {ece_only:.3f} s")
    _against_netcal(probs, labels, arrays, suite, ece_only, args.repeats, clock)
    print(f"target: full suite under 2 s -> {'met' if suite < 2.0 else 'NOT met'}")

    # The experiment runner's case: every metric with a bootstrap on a paper-sized evaluation.
    small = _first(arrays, args.bootstrap_n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boot = _best(lambda: metrics.metrics_report(small, n_resamples=args.resamples), 1, clock)
    print(f"metrics_report with {args.resamples:,} bootstrap resamples, n={len(small.confidence):,}: {boot:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
