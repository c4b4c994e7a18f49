"""Time decal's full metric suite on 1,000,000 predictions with 5 classes, against netcal's ECE.

Prints one line per measurement and the ratios. Targets (issues #4 and #20): the whole suite under
2 s and faster than netcal's ECE alone on the same data, measured in this process; a 1,000-resample
bootstrap of every metric on a paper-sized evaluation (1,180 records) in a few seconds.

    .venv/bin/python benchmarks/bench_metrics.py [--n 1000000] [--classes 5] [--repeats 5]
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


def _best(fns: dict, repeats: int, clock) -> dict[str, float]:
    """The fastest of `repeats` runs of each function, run in turns (a, b, c, a, b, c, ...) so that
    load from other processes on a shared machine hits each alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: min(t) for name, t in times.items()}


def _first(arrays, n: int):
    """The first `n` records of a `RecordArrays`: every array field sliced, the rest (labels, a
    missing `true_probs`) kept."""
    return dataclasses.replace(arrays, **{
        f.name: value[:n] for f in dataclasses.fields(arrays) if isinstance(value := getattr(arrays, f.name), np.ndarray)
    })


def _netcal_ece():
    """netcal's ECE measure, or None when netcal is not installed."""
    try:
        from netcal.metrics import ECE
    except ImportError:
        return None
    return lambda probs, labels: ECE(bins=10).measure(probs, labels)


def _print_times(times: dict, arrays, probs, labels, netcal, n: int, k: int) -> None:
    from decal import metrics

    suite, ece_only = times["suite"], times["ece"]
    print(f"decal full suite ({len(metrics.SUMMARY_KEYS) - 1} metrics, validation included), n={n:,}, K={k}: {suite:.3f} s")
    print(f"decal ECE alone (equal mass):                                      {ece_only:.3f} s")
    if netcal is None:
        print("netcal not installed (pip install -e '.[bench]'): no ratio")
    else:
        theirs, ours = netcal(probs, labels), metrics.ece(arrays.confidence, arrays.correct, binning="equal_width")
        print(f"netcal ECE alone (equal width, same data):                         {times['netcal']:.3f} s")
        print(f"ratio netcal ECE / decal full suite: {times['netcal'] / suite:.2f}x   (>1: the whole suite is faster)")
        print(f"ratio netcal ECE / decal ECE:        {times['netcal'] / ece_only:.2f}x")
        print(f"agreement: decal equal-width ECE {ours:.6f}, netcal {theirs:.6f}")
        print(f"target: full suite faster than netcal's ECE alone -> {'met' if suite < times['netcal'] else 'NOT met'}")
    print(f"target: full suite under 2 s -> {'met' if suite < 2.0 else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, metavar="N")
    parser.add_argument("--classes", type=int, default=5, metavar="K")
    parser.add_argument("--repeats", type=int, default=5, metavar="R")
    parser.add_argument("--resamples", type=int, default=1000, metavar="B", help="bootstrap resamples of the last line")
    parser.add_argument("--bootstrap-n", type=int, default=1180, metavar="N", help="records of the bootstrap line")
    parser.add_argument("--wall", action="store_true", help="Measure wall-clock time instead of CPU time.")
    args = parser.parse_args(argv)
    # CPU time of this process, not wall time: on a shared machine other jobs stretch wall time
    # for both sides unevenly, while CPU time measures the work done (numpy here is single-threaded).
    clock = time.perf_counter if args.wall else time.process_time
    print(f"timing: {'wall-clock' if args.wall else 'process CPU'} time, best of {args.repeats}, the measurements in turns")

    from decal import metrics
    from decal.records import RecordArrays

    probs, labels = _data(args.n, args.classes)
    pred = probs.argmax(1)
    arrays = RecordArrays(
        confidence=probs.max(1), correct=pred == labels, valid=np.ones(args.n, bool), option_probs=probs,
        class_probs=probs, label_index=labels, prediction_index=pred, labels=tuple(map(str, range(args.classes))),
    )
    fns = {"suite": lambda: metrics.summarize(arrays), "ece": lambda: metrics.ece(arrays.confidence, arrays.correct)}
    netcal = _netcal_ece()
    if netcal is not None:
        fns["netcal"] = lambda: netcal(probs, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # netcal's own deprecation warnings
        times = _best(fns, args.repeats, clock)
        _print_times(times, arrays, probs, labels, netcal, args.n, args.classes)

    # The experiment runner's case: every metric with a bootstrap on a paper-sized evaluation.
    small = _first(arrays, args.bootstrap_n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boot = _best({"report": lambda: metrics.metrics_report(small, n_resamples=args.resamples)}, 1, clock)["report"]
    print(f"metrics_report with {args.resamples:,} bootstrap resamples, n={len(small.confidence):,}: {boot:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
