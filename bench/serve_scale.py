"""Serving at scale: one model replica vs two, and an autoscaling app while it scales up.

Run (CPU, the bundled MiniLM with a fresh 1-output head; real QA text from ../shared/data/qa/dev.parquet)::

    python bench/serve_scale.py                         # 16 clients, 160 requests x 20 documents per mode
    python bench/serve_scale.py --device cuda --num-gpus 0.5   # on a GPU node: two replicas share one GPU

Modes, each on the same requests, through the real server (``--clients`` concurrent HTTP clients):

* ``1 replica`` / ``2 replicas``: ``serve.num_replicas`` 1 or 2, each with ``--num-cpus`` CPUs (torch
  threads) or ``--num-gpus`` GPUs.
* ``autoscaling 1->2``: ``num_replicas: auto`` (1 to 2, ``target_ongoing_requests`` 4, short delays),
  started with one replica; the load makes Serve add the second. Also prints when it came.
* ``2 replicas, one killed``: 5 s into the load one replica's process is killed (SIGKILL); prints the
  requests that did not get a 200 and how long Serve took to have two replicas again.

On a 2-core machine two 1-CPU replicas take both cores, so the HTTP proxy, the ingress and the clients
compete with them: the 2-replica gain there is bounded well below 2x. Prints one table (pairs/s,
p50/p95/p99, errors, peak memory of the biggest replica) and the 2-replica / 1-replica ratio.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Serve's autoscaler hears of the load every 10 s by default; a short bench needs it sooner.
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import DEFAULT_DATA, default_model, load_requests, print_table, run_served  # noqa: E402


def _running(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or "CrossEncoderModel" not in status.deployments:
        return 0
    return status.deployments["CrossEncoderModel"].replica_states.get("RUNNING", 0)


def run_scale_up(cfg, requests: list[dict], clients: int) -> dict:
    """``run_served`` on an autoscaling app, noting when its second replica starts running."""
    started, second = time.monotonic(), []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            try:
                if _running("bench") >= 2:
                    second.append(time.monotonic() - started)
                    return
            except Exception:
                pass

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        row = run_served("autoscaling 1->2", cfg, requests, clients)
    finally:
        done.set()
    row["batching"] += f"; 2nd replica running after {second[0]:.1f} s" if second else "; stayed at 1 replica"
    return row


def run_kill(cfg, requests: list[dict], clients: int, after_s: float = 5.0) -> dict:
    """``run_served`` on two replicas, one of them killed by pid (SIGKILL) ``after_s`` into the load."""
    import httpx

    url = f"http://127.0.0.1:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    note: dict = {}
    done = threading.Event()

    def killer() -> None:
        while not done.is_set():  # wait for the app, then for the load to run a while
            try:
                replicas = httpx.get(f"{url}/info", timeout=10).json()["replicas"]
                if len(replicas) == 2:
                    break
            except Exception:
                pass
            done.wait(0.2)
        if done.wait(after_s):
            return
        os.kill(replicas[0]["pid"], signal.SIGKILL)
        killed = time.monotonic()
        while not done.wait(0.2):
            try:
                ids = {r["replica"] for r in httpx.get(f"{url}/info", timeout=10).json()["replicas"]}
                if _running("bench") == 2 and len(ids) == 2 and replicas[0]["replica"] not in ids:
                    note["recovered_s"] = time.monotonic() - killed
                    return
            except Exception:
                pass

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        row = run_served("2 replicas, one killed", cfg, requests, clients)
    finally:
        done.set()
    recovered = f"replaced after {note['recovered_s']:.1f} s" if "recovered_s" in note else "not replaced during the run"
    row["batching"] += f"; killed replica {recovered}; {row['errors']} requests not 200"
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="CrossEncoder directory (default: bundled MiniLM, fresh 1-output head)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--modes", default="1,2,auto,kill", help="comma list of 1, 2, auto, kill")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs (torch threads) per replica")
    parser.add_argument("--num-gpus", type=float, default=0.5, help="GPUs per replica with --device cuda")
    args = parser.parse_args(argv)

    from ce_ray.config import ServeConfig

    tmp = tempfile.TemporaryDirectory(prefix="ce_ray_bench_")
    model_dir = args.model or default_model(os.path.join(tmp.name, "model"))
    requests = load_requests(args.data, args.requests, args.docs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {"model": model_dir, "port": port, "num_cpus": args.num_cpus}
    if args.device == "cuda":
        base["num_gpus"] = args.num_gpus
    print(f"model {model_dir} | {args.requests} requests x {args.docs} docs | {args.clients} clients | {args.device}, "
          f"{args.num_gpus if args.device == 'cuda' else args.num_cpus} {'GPU' if args.device == 'cuda' else 'CPU'} "
          f"per replica | this machine: {os.cpu_count()} cores")  # fmt: skip

    rows = []
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode in ("1", "2"):
            cfg = ServeConfig(**base, num_replicas=int(mode))
            label = f"{mode} replica{'s' if mode == '2' else ''}"
            rows.append({**run_served(label, cfg, requests, args.clients), "key": mode})
        elif mode == "auto":
            cfg = ServeConfig(
                **base, num_replicas="auto", min_replicas=1, max_replicas=2, target_ongoing_requests=4,
                upscale_delay_s=1, downscale_delay_s=600, look_back_period_s=2,
            )  # fmt: skip
            rows.append({**run_scale_up(cfg, requests, args.clients), "key": "auto"})
        elif mode == "kill":
            rows.append({**run_kill(ServeConfig(**base, num_replicas=2), requests, args.clients), "key": "kill"})
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    print_table(rows)
    by = {r["key"]: r for r in rows}
    if "1" in by and "2" in by:
        print(f"2 replicas / 1 replica: {by['2']['pairs_s'] / by['1']['pairs_s']:.2f}x pairs/s")


if __name__ == "__main__":
    main()
