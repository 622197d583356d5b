"""Query service under load: latency and throughput of ``dedup-index serve`` on localhost.

Usage: python bench/bench_serve.py [--rows 100000] [--backend ivf] [--clients 1,4,16]
                                   [--requests 2000] [--batch 1] [--adds 200]

Builds an index of ``--rows`` synthetic rows (``bench/synthetic.py``, D = 512, threshold
0.9; compacted), starts ``dedup-index serve`` on 127.0.0.1 (a subprocess, as a user would
run it), then, for each client count, sends ``--requests`` ``POST /query`` requests of
``--batch`` rows each from that many threads (httpx, one connection each) and reports
requests/s and latency p50/p99 as the client sees it (JSON encoding, HTTP, the index
query, JSON decoding).  A last phase repeats the query load with one more client adding
``--adds`` single rows through ``POST /add`` meanwhile (queries during adds), and reports
both.  Bounded: every phase stops after its requests or 120 s; only 127.0.0.1 is used.
The machine is shared: compare numbers within one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_lines, table  # noqa: E402
from synthetic import clustered_unit_vectors  # noqa: E402

from dedup_index.index import DedupIndex  # noqa: E402

THRESHOLD = 0.9
PHASE_LIMIT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(path: Path, port: int, key: str) -> subprocess.Popen:
    import httpx

    cli = str(Path(sys.executable).with_name("dedup-index"))
    proc = subprocess.Popen(
        [cli, "serve", str(path), "--port", str(port)],
        env=dict(os.environ, DEDUP_INDEX_API_KEY=key),
        stdout=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up")


def load(url: str, queries: np.ndarray, clients: int, requests: int, batch: int, add=None):
    """``requests`` queries from ``clients`` threads (and an adding thread): latencies."""
    import httpx

    lat: list[float] = []
    add_lat: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.time() + PHASE_LIMIT_S

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.time() < deadline:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                rows = queries[(k * batch) % len(queries) :][:batch]
                t0 = time.perf_counter()
                r = http.post("/query", json={"embeddings": rows.tolist()})
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    errors.append(r.text[:200])
                lat.append(dt)

    def adder(rows: np.ndarray, key: str) -> None:
        with httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": key}) as http:
            for r in range(len(rows)):
                if time.time() > deadline:
                    return
                t0 = time.perf_counter()
                done = http.post(
                    "/add", json={"embeddings": rows[r : r + 1].tolist(), "keys": [f"new{r}"]}
                )
                add_lat.append(time.perf_counter() - t0)
                if done.status_code != 200:
                    errors.append(done.text[:200])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    if add is not None:
        threads.append(threading.Thread(target=adder, args=add))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return lat, add_lat, errors, wall


def ms(values: list[float], q: float) -> str:
    return f"{np.percentile(np.array(values) * 1e3, q):.2f}" if values else "-"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--backend", default="ivf")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--adds", type=int, default=200)
    args = ap.parse_args(argv)
    print("\n".join(machine_lines()))
    E = clustered_unit_vectors(args.rows + args.adds, 512, seed=0)
    base, extra = E[: args.rows], E[args.rows :]
    rng = np.random.default_rng(1)
    queries = E[rng.choice(args.rows, size=min(args.rows, 4096), replace=False)]
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    key = "bench-key"
    try:
        t0 = time.perf_counter()
        with DedupIndex.create(folder / "i", 512, THRESHOLD, backend=args.backend) as index:
            index.add(base)
            index.compact(retain_seconds=0)
        print(f"index: {args.rows} rows, {args.backend}, built in {time.perf_counter() - t0:.0f} s")
        port = free_port()
        proc = start(folder / "i", port, key)
        url = f"http://127.0.0.1:{port}"
        rows = []
        try:
            phases = [(int(c), None) for c in args.clients.split(",")]
            phases.append((phases[-1][0], (extra, key)))
            for clients, add in phases:
                lat, add_lat, errors, wall = load(
                    url, queries, clients, args.requests, args.batch, add
                )
                rows.append(
                    [
                        str(clients) + (" + 1 adding" if add else ""),
                        str(len(lat)),
                        f"{len(lat) / wall:,.0f}",
                        f"{len(lat) * args.batch / wall:,.0f}",
                        ms(lat, 50),
                        ms(lat, 99),
                        str(len(add_lat)) if add else "-",
                        ms(add_lat, 50) if add else "-",
                        ms(add_lat, 99) if add else "-",
                        str(len(errors)),
                    ]
                )
                print(f"{clients} clients{' + adds' if add else ''}: done", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
        header = [
            "clients",
            "queries",
            "req/s",
            "rows/s",
            "p50 ms",
            "p99 ms",
            "adds",
            "add p50 ms",
            "add p99 ms",
            "errors",
        ]
        print(f"batch of {args.batch} row(s) per query request")
        print(table(header, rows, left=(0,)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
