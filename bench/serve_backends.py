"""CPU backends of ``ce-ray serve``: pairs/s at N concurrent clients and NDCG@10 on qa/dev, for each backend choice.

Run (CPU; a trained reranker, so that NDCG@10 means something)::

    python bench/serve_backends.py --model runs/rerank/final                 # 2 rounds, every choice
    python bench/serve_backends.py --model runs/rerank/final --rounds 3 --choices torch-fp32,onnx-qint8

Each choice is ``serve.backend`` (+ ``serve.precision`` / ``serve.model_file``), on a copy of the model exported
with :func:`ce_ray.serving.backends.export_backend` (what ``ce-ray export`` runs). Per round, every choice starts its
own server and gets the same ``--requests`` rerank requests of ``--docs`` QA documents from ``--clients`` clients
(the load of ``bench/serve_load.py``, whose helpers this reuses). The choices run interleaved, in a rotated order
each round, so a noisy neighbour on a shared machine hits them alike; the ratio to torch fp32 is taken within each
round and the median over rounds is printed. NDCG@10 is measured once per choice through the same server, on the
first ``--ndcg-queries`` queries of qa/dev (each ranks its positives among its ~20 negatives).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import serve_load

# name -> serve settings; the file names are those `ce-ray export` writes
CHOICES = {
    "torch-fp32": {"backend": "torch", "precision": "fp32"},
    "torch-bf16": {"backend": "torch", "precision": "bf16"},
    "onnx": {"backend": "onnx", "model_file": "model.onnx"},
    "onnx-O3": {"backend": "onnx", "model_file": "model_O3.onnx"},
    "onnx-qint8": {"backend": "onnx", "model_file": "model_qint8_avx512_vnni.onnx"},
    "onnx-O3-qint8": {"backend": "onnx", "model_file": "model_O3_qint8_avx512_vnni.onnx"},
    "openvino-fp32": {"backend": "openvino", "precision": "fp32"},
    "openvino-bf16": {"backend": "openvino", "precision": "bf16"},
    # the same with serve.fusion (the retriever's cosines fused in; pairs/s does not depend on the weight)
    "torch-fp32+fusion": {"backend": "torch", "precision": "fp32", "fusion": 0.5, "fusion_retriever": "bundled:all-MiniLM-L6-v2"},
    "openvino-bf16+fusion": {"backend": "openvino", "precision": "bf16", "fusion": 0.5, "fusion_retriever": "bundled:all-MiniLM-L6-v2"},
}
EXPORTS = {  # what each choice needs exported: (backend, optimize, quantize)
    "onnx": ("onnx", None, None),
    "onnx-O3": ("onnx", "O3", None),
    "onnx-qint8": ("onnx", None, "avx512_vnni"),
    "onnx-O3-qint8": ("onnx", "O3", "avx512_vnni"),
    "openvino-fp32": ("openvino", None, None),
    "openvino-bf16": ("openvino", None, None),
    "openvino-bf16+fusion": ("openvino", None, None),
}


def ndcg_at_10(url: str, rows: list[dict]) -> float:
    """Mean NDCG@10 (binary relevance) of the server's ranking of each row's positives among its negatives."""
    import httpx

    scores = []
    with httpx.Client(timeout=300) as client:
        for row in rows:
            docs = [*row["positive"], *row["negative"]]
            answer = client.post(f"{url}/rerank", json={"query": row["query"], "documents": docs}).json()
            relevant = [r["index"] < len(row["positive"]) for r in answer["results"]][:10]
            dcg = sum(rel / np.log2(i + 2) for i, rel in enumerate(relevant))
            ideal = sum(1 / np.log2(i + 2) for i in range(min(10, len(row["positive"]))))
            scores.append(dcg / ideal)
    return float(np.mean(scores))


def start_all(model_dir: str, port: int, choices: list[str], threads: int) -> dict[str, str]:
    """One Serve app per choice (route ``/<choice>``), all up at once: idle replicas cost little, so the timed
    loads can alternate between choices every few seconds without restarts."""
    from ce_ray.config import ServeConfig
    from ce_ray.serving import start_server, wait_until_ready

    # serve.num_cpus is the Ray resource; it rounds to the torch/ORT/OpenVINO threads (at least 1). A fraction
    # lets every replica fit on a small machine; each still computes with `threads` threads.
    urls = {}
    for choice in choices:
        cfg = ServeConfig(model=model_dir, port=port, route_prefix=f"/{choice}", num_cpus=threads if threads > 1 else 0.25,
                          **CHOICES[choice])
        urls[choice] = start_server(cfg, name=f"bench-{choice}", wait=False, access_log=False)
    for choice, url in urls.items():
        wait_until_ready(url, f"bench-{choice}", timeout_s=600)
    return urls


def load(url: str, requests: list[dict], clients: int) -> dict:
    """The timed load on one server (after a warm-up of one request per client)."""
    asyncio.run(serve_load._drive(url, requests[:clients], clients))
    latencies, errors, wall = asyncio.run(serve_load._drive(url, requests, clients))
    return serve_load._row(url, requests, latencies, errors, wall, 0.0, None)


def prepare_model(model: str | None, out: str, choices: list[str]) -> str:
    """A copy of ``model`` (default: the bundled MiniLM, fresh head) with every export the choices need."""
    from ce_ray.serving.backends import export_backend

    source = model or serve_load.default_model(os.path.join(out, "source"))
    target = os.path.join(out, "model")
    needed = list(dict.fromkeys(EXPORTS[c] for c in choices if c in EXPORTS))
    if not needed:
        return source
    export_backend(source, *needed[0], output=target)
    for backend, optimize, quantize in needed[1:]:
        export_backend(target, backend, optimize=optimize, quantize=quantize)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="CrossEncoder directory (default: bundled MiniLM with a fresh head: NDCG is noise)")
    parser.add_argument("--data", type=Path, default=serve_load.DEFAULT_DATA, help="qa/dev.parquet")
    parser.add_argument("--choices", default=",".join(CHOICES), help=f"comma-separated, of {', '.join(CHOICES)}")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median reported)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160, help="requests per choice and round")
    parser.add_argument("--docs", type=int, default=20, help="documents per request")
    parser.add_argument("--ndcg-queries", type=int, default=200, help="qa/dev queries for NDCG@10 (0: skip)")
    parser.add_argument("--num-cpus", type=int, default=1, help="serve.num_cpus: threads of the replica")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    import pandas as pd

    choices = [c.strip() for c in args.choices.split(",") if c.strip()]
    unknown = sorted(set(choices) - set(CHOICES))
    if unknown:
        parser.error(f"--choices: unknown {', '.join(unknown)}; known: {', '.join(CHOICES)}")
    tmp = tempfile.TemporaryDirectory(prefix="ce_ray_backends_")
    model_dir = prepare_model(args.model, tmp.name, choices)
    requests = serve_load.load_requests(args.data, args.requests, args.docs)
    ndcg_rows = pd.read_parquet(args.data).head(args.ndcg_queries).to_dict("records") if args.ndcg_queries else []
    for row in ndcg_rows:
        row["positive"], row["negative"] = [str(t) for t in row["positive"]], [str(t) for t in row["negative"]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"model {args.model or 'bundled MiniLM, fresh head'} | {args.requests} requests x {args.docs} docs | "
          f"{args.clients} clients | {args.num_cpus} thread(s) | {args.rounds} rounds | NDCG@10 on {len(ndcg_rows)} queries")

    import httpx
    from ray import serve

    urls = start_all(model_dir, port, choices, args.num_cpus)
    ndcg, precision = {}, {}
    for choice, url in urls.items():
        precision[choice] = httpx.get(f"{url}/info", timeout=60).json()["precision"]
        ndcg[choice] = ndcg_at_10(url, ndcg_rows) if ndcg_rows else None
        print(f"{choice:<14} precision {precision[choice]:<5}" + (f" NDCG@10 {ndcg[choice]:.4f}" if ndcg_rows else ""), flush=True)
    results: dict[str, list[dict]] = {c: [] for c in choices}
    for rnd in range(args.rounds):
        order = choices[rnd % len(choices):] + choices[: rnd % len(choices)]  # rotate: no choice always runs first
        for choice in order:
            row = load(urls[choice], requests, args.clients)
            results[choice].append(row)
            print(f"round {rnd + 1} {choice:<14} {row['pairs_s']:7.1f} pairs/s  p50 {row['p50']:6.0f} ms  "
                  f"errors {row['errors']}", flush=True)
    serve.shutdown()

    base = results.get("torch-fp32")
    print(f"\n{'choice':<14} {'pairs/s (median)':>16} {'per round':>30} {'x torch fp32':>12} {'NDCG@10':>8} {'p50 ms':>7} {'errors':>6}")
    table = []
    for choice in choices:
        rows = results[choice]
        ratios = [r["pairs_s"] / b["pairs_s"] for r, b in zip(rows, base)] if base else []
        entry = {
            "choice": choice,
            "pairs_s": statistics.median(r["pairs_s"] for r in rows),
            "per_round": [round(r["pairs_s"], 1) for r in rows],
            "ratio": statistics.median(ratios) if ratios else None,
            "ndcg": ndcg[choice],
            "precision": precision[choice],
            "p50": statistics.median(r["p50"] for r in rows),
            "errors": sum(r["errors"] for r in rows),
        }
        table.append(entry)
        ratio = f"{entry['ratio']:.2f}x" if entry["ratio"] is not None else "-"
        quality = f"{entry['ndcg']:.4f}" if entry["ndcg"] is not None else "-"
        print(f"{choice:<14} {entry['pairs_s']:>16.1f} {' / '.join(map(str, entry['per_round'])):>30} {ratio:>12} "
              f"{quality:>8} {entry['p50']:>7.0f} {entry['errors']:>6}")
    if base and ndcg.get("torch-fp32") is not None:
        reference = ndcg["torch-fp32"]
        ok = [t for t in table if t["choice"] != "torch-fp32" and abs(t["ndcg"] - reference) <= 0.01]
        best = max(ok, key=lambda t: t["ratio"], default=None)
        if best:
            verdict = "met" if best["ratio"] >= 2 else "not met"
            print(f"best within 0.01 NDCG@10 of torch fp32: {best['choice']} at {best['ratio']:.2f}x (goal >= 2x: {verdict})")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "table": table}, indent=2))


if __name__ == "__main__":
    main()
