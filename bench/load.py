"""Load test: `translator serve` at several concurrency levels, on loopback only.

Sends `POST /v1/translate` requests (one Multi30k test sentence each, at `--beam-size`) from
N concurrent clients, and prints requests/s, p50/p99 latency, errors, texts per model call (from
the server's /metrics), and the throughput gain from micro-batching (highest concurrency vs 1).
`--soak N` then sends N more requests and reports the server's resident memory before and after.

    python bench/load.py --model saved_models/en-fr            # starts a server on a free port
    python bench/load.py --url http://127.0.0.1:8080            # an already running server
    python bench/load.py --model saved_models/en-fr --soak 10000

Every level is bounded by `--requests` and `--duration` seconds, and the script stops by itself
(a server it started is stopped at the end). Only loopback URLs are accepted. Targets for the
shipped model at beam 5 on the 2-core CPU: no errors, p50 < 100 ms at concurrency 1, and at
least 4x the concurrency-1 throughput at concurrency 32 (`--check` exits 1 when one is missed).
"""

import argparse
import asyncio
import gzip
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from translator.server.testing import start_server, stop_server, wait_ready

FALLBACK_SENTENCES = [
    "A man in an orange hat starring at something.",
    "A Boston Terrier is running on lush green grass in front of a white fence.",
    "A girl in karate uniform breaking a stick with a front kick.",
    "Five people wearing winter jackets and helmets stand in the snow, with snowmobiles in the "
    "background.",
    "People are fixing the roof of a house.",
    "A man in light colored clothing photographs a group of men wearing dark suits and hats "
    "standing around a woman dressed in a strapless gown.",
    "A group of people standing in front of an igloo.",
    "A boy in a red uniform is attempting to avoid getting out at home plate, while the catcher "
    "in the blue uniform is attempting to catch him.",
    "A guy works on a building.",
    "A man in a vest is sitting in a chair and holding magazines.",
    "A mother and her young song enjoying a beautiful day outside.",
    "Men playing volleyball, with one player missing the ball but hands still in the air.",
]
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def sentences(data_dir: str | None) -> tuple[list[str], str]:
    """Multi30k test sentences (English side) from `data_dir`, else a built-in dozen."""
    folder = Path(data_dir or os.environ.get("TRANSLATOR_DATA_DIR", "")) / "multi30k"
    for name in ("test_2016_flickr.en.gz", "test_2016_flickr.en", "test.en.gz", "test.en"):
        path = folder / name
        if path.is_file():
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip()]
            if lines:
                return lines, str(path)
    return FALLBACK_SENTENCES, "built-in sample (no Multi30k test file found)"


def metrics(url: str) -> dict[str, float]:
    """The unlabelled samples of the server's /metrics (what this script reads from it)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def run_level(url, texts, concurrency, requests, duration, beam_size, offset=0):
    """`requests` requests from `concurrency` clients, stopping after `duration` seconds."""
    latencies, errors, next_index = [], [], [0]
    deadline = time.monotonic() + duration

    async def worker():
        # One client (one keep-alive connection) per simulated user: a shared connection pool
        # serializes in the client at high concurrency and would measure httpx, not the server.
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while next_index[0] < requests and time.monotonic() < deadline:
                i = next_index[0]
                next_index[0] += 1
                body = {"text": texts[(offset + i) % len(texts)]}
                if beam_size is not None:
                    body["beam_size"] = beam_size
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/translate", json=body)
                    if response.status_code != 200:
                        errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                        continue
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="export directory: start `translator serve` on it")
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080 (loopback)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=300, help="requests per level")
    parser.add_argument("--duration", type=float, default=60, help="seconds per level, at most")
    parser.add_argument("--beam-size", type=int, default=5, help="0: the model's default")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests first")
    parser.add_argument("--soak", type=int, default=0, help="then N requests; report RSS")
    parser.add_argument("--soak-concurrency", type=int, default=8)
    parser.add_argument("--data-dir", help="folder with multi30k/ (else $TRANSLATOR_DATA_DIR)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra serve argument")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    proc = None
    if args.url:
        url = args.url.rstrip("/")
        if urlparse(url).hostname not in LOOPBACK:
            parser.error("only loopback servers (127.0.0.1, localhost, ::1) may be load-tested")
    else:
        proc, url = start_server(args.model, *args.server_arg)
    try:
        if not wait_ready(url, proc, 300):
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            raise SystemExit(f"{url} was not ready within 300 s")
        return run(url, args)
    finally:
        if proc is not None:
            stop_server(proc)


def run(url: str, args) -> int:
    texts, source = sentences(args.data_dir)
    beam = args.beam_size or None
    print(f"server {url}; {len(texts)} sentences from {source}; beam size {beam or 'default'}")
    asyncio.run(run_level(url, texts, 4, args.warmup, 60, beam))  # untimed warm-up
    rows = {}
    header = (
        f"{'concurrency':>11} {'requests':>8} {'errors':>6} {'req/s':>8} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'texts/call':>10}"
    )
    print(header)
    for level in args.concurrency:
        before = metrics(url)
        latencies, errors, elapsed = asyncio.run(
            run_level(url, texts, level, args.requests, args.duration, beam)
        )
        after = metrics(url)
        calls = after["translator_batch_texts_count"] - before["translator_batch_texts_count"]
        merged = after["translator_batch_texts_sum"] - before["translator_batch_texts_sum"]
        rps = len(latencies) / elapsed if elapsed > 0 else 0.0
        rows[level] = (rps, percentile(latencies, 50) * 1000, len(errors))
        print(
            f"{level:>11} {len(latencies) + len(errors):>8} {len(errors):>6} {rps:>8.1f} "
            f"{rows[level][1]:>8.1f} {percentile(latencies, 99) * 1000:>8.1f} "
            f"{(merged / calls if calls else 0):>10.1f}"
        )
        for error in errors[:3]:
            print(f"    error: {error}")
    low, high = min(rows), max(rows)
    gain = rows[high][0] / rows[low][0] if rows[low][0] else float("nan")
    print(f"micro-batching gain: {gain:.1f}x the throughput at concurrency {high} vs {low}")

    ok = all(errors == 0 for _, _, errors in rows.values())
    checks = [("no errors", ok)]
    if 1 in rows:
        checks.append(("p50 < 100 ms at concurrency 1", rows[1][1] < 100))
    if 1 in rows and 32 in rows:
        checks.append(("concurrency 32 >= 4x concurrency 1", rows[32][0] >= 4 * rows[1][0]))

    if args.soak:
        # In five chunks, reading the server's RSS after each: flat after warm-up, or growing?
        rss = [metrics(url).get("process_resident_memory_bytes", float("nan"))]
        chunk, sent, failed, elapsed = -(-args.soak // 5), 0, 0, 0.0
        while sent < args.soak:
            n = min(chunk, args.soak - sent)
            latencies, errors, seconds = asyncio.run(
                run_level(url, texts, args.soak_concurrency, n, 24 * 3600, beam, offset=7 + sent)
            )
            sent, failed, elapsed = sent + n, failed + len(errors), elapsed + seconds
            rss.append(metrics(url).get("process_resident_memory_bytes", float("nan")))
        mib = [f"{r / 2**20:.0f}" for r in rss]
        print(
            f"soak: {sent} requests at concurrency {args.soak_concurrency} in {elapsed:.0f} s, "
            f"{failed} errors; server RSS {mib[0]} MiB at start, {mib[-1]} MiB at end "
            f"({(rss[-1] - rss[0]) / 2**20:+.0f} MiB); every {chunk} requests: {' '.join(mib)} MiB"
        )
        checks.append(("soak: no errors", failed == 0))
        checks.append(("soak: RSS grew < 10%", rss[-1] < 1.1 * rss[0]))
    print("targets (meaningful for the shipped model at beam 5 on an idle machine):")
    for name, passed in checks:
        print(f"  {'PASS' if passed else 'MISS'}  {name}")
    return 1 if args.check and not all(passed for _, passed in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
