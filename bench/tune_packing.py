"""Trial packing: N concurrent Tune trials at 1/N GPU each vs one trial holding the whole GPU.

Small models leave a big GPU mostly idle; fractional ``scaling.gpus_per_worker`` lets Tune run
several trials on it at once. This prints the aggregate training samples/s of both layouts.

    python bench/tune_packing.py --device cuda                  # 4 trials x 0.25 GPU vs 1 trial x 1 GPU
    python bench/tune_packing.py --device cuda --pack 8 --rows 20000

Goal (one H200): 4 trials at 0.25 GPU each reach >= 2.5x the samples/s of one trial on the whole GPU.
``--device cpu`` only checks that the script runs (the trials share the cores; the ratio means nothing):
it is what ``bench/gpu_suite.sh --dry-run`` uses.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "nli"


def run(pack: int, args, train: str, dev: str) -> tuple[float, float]:
    """Run ``pack`` identical trials at 1/pack GPU each; return (aggregate samples/s, wall seconds)."""
    from ce_ray.config import load_job
    from ce_ray.tuning import run_tuning

    out = tempfile.mkdtemp(prefix=f"bench_pack{pack}_")
    job = load_job(
        None,
        base={
            "task": "nli",
            "model": {"name": args.model},
            "data": {"train": train, "eval": dev},
            "train": {"batch_size": args.batch, "precision": args.precision, "learning_rate": 5e-5},
            "scaling": {"num_workers": 1, "use_gpu": args.device == "cuda", "gpus_per_worker": 1.0 / pack,
                        "cpus_per_worker": 1 if args.device == "cuda" else 0.9 / pack},
            "run": {"output_dir": out, "name": f"pack{pack}", "checkpoint_every": 100000},
            "tune": {"num_samples": pack, "search": "random", "scheduler": "none", "max_concurrent_trials": pack,
                     "search_space": {"train.seed": {"choice": list(range(pack))}}},
        },
    )
    started = time.time()
    outcome = run_tuning(job)
    wall = time.time() - started
    rows = 0
    for trial in outcome.trials:
        stats = Path(out) / f"pack{pack}-trials" / f"trial-{trial['trial_id']}" / "workers" / "rank0.json"
        rows += json.loads(stats.read_text())["rows_seen"]
    train_wall = max(t["wall_time_s"] or 0 for t in outcome.trials)
    return rows / train_wall, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="bundled:all-MiniLM-L6-v2")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with NLI train.parquet and dev.parquet")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--pack", type=int, default=4)
    args = parser.parse_args()

    import pandas as pd
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tune_packing needs a GPU (run it with --device cuda on a GPU machine)")
    work = tempfile.mkdtemp(prefix="bench_pack_data_")
    train, dev = os.path.join(work, "train.parquet"), os.path.join(work, "dev.parquet")
    frame = pd.read_parquet(args.data / "train.parquet")
    pd.concat([frame] * (args.rows // len(frame) + 1)).head(args.rows).to_parquet(train)
    pd.read_parquet(args.data / "dev.parquet").head(256).to_parquet(dev)

    single, single_wall = run(1, args, train, dev)
    packed, packed_wall = run(args.pack, args, train, dev)
    print(f"\n{'layout':36} {'samples/s (all trials)':>24} {'wall s':>8}")
    print(f"{'1 trial x 1 GPU':36} {single:24.0f} {single_wall:8.0f}")
    print(f"{f'{args.pack} trials x {1 / args.pack:g} GPU':36} {packed:24.0f} {packed_wall:8.0f}")
    print(f"packing gain: {packed / single:.2f}x (goal >= 2.5x for 4 trials); peak GPU memory is in each trial's workers/rank0.json")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "pack": args.pack, "batch": args.batch, "rows": args.rows,
                                         "single_samples_per_second": single, "packed_samples_per_second": packed,
                                         "gain": packed / single, "single_wall_s": single_wall, "packed_wall_s": packed_wall}, indent=2))


if __name__ == "__main__":
    main()
