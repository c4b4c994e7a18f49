"""Bounded load test of `decal serve` on loopback: SmolLM2 on XSTest at concurrency 1, 8 and 32.

Starts its own server (`python -m decal serve --model smollm2-135m-instruct --task xstest`, port
picked by the server, 127.0.0.1 only), then for each concurrency level sends a fixed number of
requests (one XSTest input each, cycling through the split) from that many concurrent clients,
and stops at the request count or the time cap, whichever comes first. It prints, per level:
requests, errors (non-200 or transport), seconds, throughput, p50/p99 latency, the mean batch
size the server formed (from its /metrics), and the throughput ratio to concurrency 1 (batch-1
serving: each request scored alone). It also times one full batch (one request of
`--max-batch-size` inputs, alone) and compares the p99 latency at the highest level to it.

Targets on the 2-core CPU (issue 16): 0 errors; at concurrency 32 at least 3x the throughput of
batch-1 serving; p99 latency under 2x the latency of one full batch. Absolute times depend on
the machine and its load; the ratios are measured in the same run.

The levels run interleaved in `--rounds` rounds (each round a share of every level's requests
and one full-batch timing), so load from other processes on a shared machine hits all alike.

With `--compare-log` it measures the decision log's cost instead (issue 24): two servers, one
with `--state-dir` (every answer committed to SQLite, fsynced, before it is sent; the monitor
fed) and one without, the same load at one concurrency (32) in interleaved rounds, alternating
which goes first; it prints both throughputs and their ratio (target: >= 0.9x with the log on).

Usage: python benchmarks/bench_serve.py [--requests 64,128,256] [--time-cap 300] [--rounds 2] [--dtype float32]
       [--max-batch-size 32] [--max-wait-ms 50] [--threads 1] [--concurrency 1,8,32] [--server-arg=--flag ...]
       python benchmarks/bench_serve.py --compare-log [--concurrency 32] [--requests 256] [--rounds 4]
       [--model smollm2-135m-instruct]

The test suite runs it at a tiny size on a tiny random Qwen3 (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time

import httpx

from decal.serve.process import ServeProcess
from decal.tasks import load_task

__all__ = ["main"]


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _batch_totals(client: httpx.Client) -> tuple[float, float, float]:
    text = client.get("/metrics").text
    return (_metric(text, "decal_batch_size_count"), _metric(text, "decal_batch_size_sum"),
            _metric(text, "decal_batch_duration_seconds_sum"))


async def _level(url: str, texts: list[str], *, concurrency: int, n_requests: int, time_cap: float) -> dict:
    """`concurrency` clients send `n_requests` requests in all, or until `time_cap` seconds pass."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    next_index = 0
    deadline = time.monotonic() + time_cap
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < n_requests and time.monotonic() < deadline:
            text = texts[next_index % len(texts)]
            next_index += 1
            start = time.perf_counter()
            try:
                r = await client.post("/v1/decide", json={"inputs": [text]})
                ok = r.status_code == 200
                kind = None if ok else f"http {r.status_code}"
            except httpx.HTTPError as e:
                kind = type(e).__name__
            if kind is None:
                latencies.append(time.perf_counter() - start)
            else:
                errors[kind] = errors.get(kind, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {"ok": len(latencies), "errors": errors, "seconds": seconds, "latencies": latencies}


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _full_batch_latency(client: httpx.Client, texts: list[str], size: int, repeats: int = 3) -> float:
    """Median latency of one request holding a full batch, sent alone."""
    times = []
    for k in range(repeats):
        batch = [texts[(k * size + j) % len(texts)] for j in range(size)]
        start = time.perf_counter()
        r = client.post("/v1/decide", json={"inputs": batch})
        r.raise_for_status()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compare_log(args, texts: list[str], server_args: list[str], env: dict) -> int:
    """The same load on a server with the decision log and one without, in interleaved rounds."""
    concurrency = int(args.concurrency.split(",")[-1])
    n = int(args.requests.split(",")[-1])
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="bench-serve-state-") as state:
        servers = {"off": ServeProcess(server_args, env=env).start(),
                   "on": ServeProcess([*server_args, "--state-dir", state], env=env).start()}
        totals = {k: {"ok": 0, "errors": 0, "seconds": 0.0, "latencies": []} for k in servers}
        try:
            for name, server in servers.items():
                with httpx.Client(base_url=server.url, timeout=600) as client:
                    for text in texts[:4]:
                        client.post("/v1/decide", json={"inputs": [text]}).raise_for_status()
            for r in range(args.rounds):
                share = n // args.rounds + (1 if r < n % args.rounds else 0)
                for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    row = asyncio.run(_level(servers[name].url, texts, concurrency=concurrency, n_requests=share,
                                             time_cap=args.time_cap / args.rounds))
                    t = totals[name]
                    t["ok"] += row["ok"]
                    t["errors"] += sum(row["errors"].values())
                    t["seconds"] += row["seconds"]
                    t["latencies"] += row["latencies"]
            with httpx.Client(base_url=servers["on"].url, timeout=60) as client:
                logged = client.get("/v1/monitor").json()["decisions"]
        finally:
            status = {name: s.stop() for name, s in servers.items()}
    print(f"decal serve decision log on vs off, {args.model} ({args.dtype}) on XSTest, 127.0.0.1, concurrency "
          f"{concurrency}, {n} requests each in {args.rounds} interleaved rounds, {os.cpu_count()} CPUs; "
          f"load average before/after: {load_before} / {_load()}")
    print("| decision log | requests ok | errors | seconds | throughput req/s | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ("off", "on"):
        t = totals[name]
        lat = sorted(t["latencies"])
        q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan"))
        print(f"| {name} | {t['ok']} | {t['errors']} | {t['seconds']:.1f} | {t['ok'] / t['seconds']:.2f} | "
              f"{1000 * q(0.5):.0f} | {1000 * q(0.99):.0f} |")
    ratio = (totals["on"]["ok"] / totals["on"]["seconds"]) / (totals["off"]["ok"] / totals["off"]["seconds"])
    print(f"target: log on / off throughput {ratio:.3f}x (>= 0.9x) {'PASS' if ratio >= 0.9 else 'FAIL'}; decisions in the "
          f"log {logged} (warm-up 4 + {totals['on']['ok']} requests); server exit status {status}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias or local model folder")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", default="64,128,256", help="requests per level (one value, or one per level)")
    parser.add_argument("--time-cap", type=float, default=300.0, help="seconds per level at most (all rounds)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--threads", type=int, default=1, help="server torch threads (1 leaves a core for HTTP and the clients)")
    parser.add_argument("--rounds", type=int, default=2, help="levels interleaved in this many rounds")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `decal serve` argument (repeatable)")
    parser.add_argument("--compare-log", action="store_true", help="decision log on vs off at the last concurrency level")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    counts = counts * len(levels) if len(counts) == 1 else counts
    texts = [ex.input for ex in load_task("xstest", "test").examples]
    load_before = _load()

    server_args = ["--model", args.model, "--task", "xstest", "--host", "127.0.0.1", "--dtype", args.dtype,
                   "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
                   "--max-queue", str(max(256, 2 * max(levels))), "--request-timeout", "600", "--no-access-log",
                   *args.server_arg]
    if args.threads:  # 0: torch's default
        server_args += ["--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("DECAL_API_KEY", None)
    if args.compare_log:
        return _compare_log(args, texts, server_args, env)
    server = ServeProcess(server_args, env=env).start()
    # Levels run in rounds, each round a share of every level's requests and one full-batch
    # timing, so load from other processes on a shared machine hits every level alike.
    totals = {c: {"ok": 0, "errors": {}, "seconds": 0.0, "latencies": [], "batches": 0.0, "inputs": 0.0, "busy": 0.0}
              for c in levels}
    full_batches = []
    try:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            for text in texts[:4]:  # warm-up
                client.post("/v1/decide", json={"inputs": [text]}).raise_for_status()
            for r in range(args.rounds):
                full_batches.append(_full_batch_latency(client, texts, args.max_batch_size, repeats=1))
                for concurrency, n in zip(levels, counts):
                    share = n // args.rounds + (1 if r < n % args.rounds else 0)
                    before = _batch_totals(client)
                    row = asyncio.run(_level(server.url, texts, concurrency=concurrency, n_requests=share,
                                             time_cap=args.time_cap / args.rounds))
                    after = _batch_totals(client)
                    t = totals[concurrency]
                    t["ok"] += row["ok"]
                    t["seconds"] += row["seconds"]
                    t["latencies"] += row["latencies"]
                    for kind, k in row["errors"].items():
                        t["errors"][kind] = t["errors"].get(kind, 0) + k
                    for key, a, b in zip(("batches", "inputs", "busy"), after, before):
                        t[key] += a - b
    finally:
        status = server.stop()
    full_batch = statistics.median(full_batches)
    rows = []
    for concurrency in levels:
        t = totals[concurrency]
        lat = sorted(t["latencies"])
        q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan"))
        rows.append({"concurrency": concurrency, "ok": t["ok"], "errors": t["errors"], "seconds": t["seconds"],
                     "throughput": t["ok"] / t["seconds"], "p50": q(0.50), "p99": q(0.99),
                     "mean_batch": t["inputs"] / t["batches"] if t["batches"] else float("nan"),
                     "busy": t["busy"] / t["seconds"]})
    base = rows[0]["throughput"]
    print(f"decal serve, {args.model} ({args.dtype}) on XSTest, 127.0.0.1, "
          f"max batch {args.max_batch_size}, max wait {args.max_wait_ms:g} ms, {os.cpu_count()} CPUs")
    print(f"one full batch of {args.max_batch_size} inputs alone: {1000 * full_batch:.0f} ms (median of {len(full_batches)}); "
          f"levels interleaved in {args.rounds} rounds; load average before/after: {load_before} / {_load()}")
    print("| concurrency | requests ok | errors | seconds | throughput req/s | p50 ms | p99 ms | mean batch | engine busy | vs concurrency 1 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        errs = sum(r["errors"].values())
        print(f"| {r['concurrency']} | {r['ok']} | {errs}{' ' + str(r['errors']) if errs else ''} | {r['seconds']:.1f} | "
              f"{r['throughput']:.2f} | {1000 * r['p50']:.0f} | {1000 * r['p99']:.0f} | {r['mean_batch']:.1f} | "
              f"{100 * r['busy']:.0f}% | {r['throughput'] / base:.2f}x |")
    top = rows[-1]
    total_errors = sum(sum(r["errors"].values()) for r in rows)
    print(f"targets: errors {total_errors} (0) {'PASS' if total_errors == 0 else 'FAIL'}; "
          f"concurrency {top['concurrency']} / 1 throughput {top['throughput'] / base:.2f}x (>= 3x) "
          f"{'PASS' if top['throughput'] >= 3 * base else 'FAIL'}; "
          f"p99 {1000 * top['p99']:.0f} ms vs 2 x full batch {2000 * full_batch:.0f} ms "
          f"{'PASS' if top['p99'] < 2 * full_batch else 'FAIL'}; server exit status {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
