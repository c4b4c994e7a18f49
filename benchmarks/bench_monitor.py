"""The monitor's alarms on simulated traffic: false-alarm rates and median detection delays (issue 24).

Pools of records (`decal.serve.simulate`): by default the `verdicts` generator's examples with a
model-like score, served through a Platt calibrator fitted on the in-domain validation split and
the threshold `decal threshold` picks there for `--target` (the promise); with `--in RUN` and
`--shift RUN ...` the records of real `verdicts` runs instead (they must carry `true_probs`).
Every label is drawn from the record's true probabilities.

Scenarios: no drift (the promise set to the pool's exact accuracy of answered decisions, the
least favourable null), then a switch after `--before` decisions to each shifted pool (the OOD
variant's records; a miscalibrated model's). Per scenario and alarm: the false-alarm rate
(fired before the switch) with its binomial 99.9 % bound at alpha, the share of streams where
it fired after the switch, and the median delay in requests and in labels after the switch.

Speed: the vectorised simulation against the server's streaming alarm classes on the same
decisions (streams per second, ratio printed).

Usage: python benchmarks/bench_monitor.py [--streams 1000] [--before 500] [--after 2000] [--label-rate 0.25]
       [--target 0.8] [--alpha 0.05] [--in RUN --shift RUN ...] [--speed-decisions 2000]

The test suite runs it at a tiny size (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from scipy.stats import binom

from decal.serve.alarms import DriftAlarm, GuaranteeAlarm
from decal.serve.simulate import simulate_streams, stream_pool, verdicts_records


def _pools(args):
    from decal.calibrators import apply_calibrator, fit_calibrator
    from decal.records import read_records, records_to_arrays
    from decal.selective import choose_threshold

    if args.in_run:
        inside = read_records(args.in_run)
        shifted = {run: read_records(run) for run in args.shift}
        fit = inside
    else:
        inside = verdicts_records("in")
        shifted = {"OOD variant (reader misreads half the unfamiliar words)": verdicts_records("ood", read_accuracy=0.5, mass=(14.0, 3.0)),
                   "miscalibrated model (sharpness 3)": verdicts_records("in", read_accuracy=0.7, sharpness=3.0, seed=1)}
        fit = [r for r in inside if r.split == "validation"]
    platt = fit_calibrator("platt", fit)
    calibrated = records_to_arrays(apply_calibrator(platt, fit))
    choice = choose_threshold(calibrated.confidence, calibrated.correct, target_accuracy=args.target)
    if choice.threshold is None:
        raise SystemExit(f"no threshold reaches {args.target} on the calibration records; lower --target")

    def pool(records):
        return stream_pool(records, calibrator=platt, threshold=choice.threshold)

    return pool(inside), {name: pool(r) for name, r in shifted.items()}, choice


def _streaming_speed(pool, n: int, alpha: float) -> float:
    """Decisions per second through the server's streaming classes (one stream)."""
    rng = np.random.default_rng(0)
    idx = rng.integers(len(pool.confidence), size=n)
    drift = DriftAlarm({"confidence": pool.confidence[:500], "label_mass": pool.label_mass[:500]}, alpha=alpha)
    guarantee = GuaranteeAlarm(max(min(pool.accuracy, 0.99), 0.01), alpha=alpha)
    start = time.perf_counter()
    for i in idx:
        drift.update({"confidence": pool.confidence[i], "label_mass": pool.label_mass[i]},
                     {"confidence": rng.random(), "label_mass": rng.random()})
        guarantee.update(bool(rng.random() < pool.p_correct[i]))
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--reference", type=int, default=500, help="reference window size")
    parser.add_argument("--before", type=int, default=500)
    parser.add_argument("--after", type=int, default=2000)
    parser.add_argument("--label-rate", type=float, default=0.25)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--in", dest="in_run", default=None, help="in-domain run (records with true_probs)")
    parser.add_argument("--shift", nargs="*", default=[], help="runs to switch to")
    parser.add_argument("--speed-decisions", type=int, default=2000, help="decisions of the streaming-speed timing")
    args = parser.parse_args(argv)
    inside, shifted, choice = _pools(args)
    bound = int(binom.ppf(0.999, args.streams, args.alpha))
    print(f"pools: in-domain accuracy of answered {inside.accuracy:.3f} at threshold {choice.threshold} "
          f"(coverage {inside.coverage:.2f}); promise {args.target}; alpha {args.alpha}; {args.streams} streams, "
          f"reference {args.reference}, label rate {args.label_rate}; false alarms allowed (99.9 % binomial) {bound}")
    start = time.perf_counter()
    null = simulate_streams(inside, None, n_streams=args.streams, n_reference=args.reference, n_before=args.before + args.after,
                            label_rate=args.label_rate, target=inside.accuracy, alpha=args.alpha, seed=1)
    seconds = time.perf_counter() - start
    print("| scenario | alarm | false alarms | fired after switch | median delay, requests | median delay, labels |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for alarm in ("guarantee", "drift"):
        k = round(null.false_alarm_rate(alarm) * args.streams)
        print(f"| no drift, {args.before + args.after} decisions | {alarm} | {k} ({100 * k / args.streams:.1f} %) | – | – | – |")
    for name, pool in shifted.items():
        result = simulate_streams(inside, pool, n_streams=args.streams, n_reference=args.reference, n_before=args.before,
                                  n_after=args.after, label_rate=args.label_rate, target=args.target, alpha=args.alpha, seed=2)
        for alarm in ("guarantee", "drift"):
            d = result.detection(alarm)
            k = round(result.false_alarm_rate(alarm) * args.streams)
            print(f"| {name}: accuracy of answered {pool.accuracy:.3f}, label-free estimate "
                  f"{pool.confidence[pool.answered].mean():.3f} | {alarm} | {k} | {100 * d['rate']:.1f} % | "
                  f"{d['median_requests']:.0f} | {d['median_labels']:.0f} |")
    vectorised = args.streams * (args.before + args.after) / seconds
    streaming = _streaming_speed(inside, args.speed_decisions, args.alpha)
    print(f"speed: vectorised simulation {vectorised:,.0f} decisions/s vs the server's streaming alarms "
          f"{streaming:,.0f} decisions/s ({vectorised / streaming:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
