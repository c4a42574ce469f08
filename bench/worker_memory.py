"""Host memory per training worker for a 100k-row training set: memory-mapped Arrow vs a private copy.

ce-ray prepares the training rows once (``ce_ray.data.prepare``) and every worker opens the Arrow files
memory-mapped (``load_prepared``), so the rows live once in the OS page cache, shared by all workers
of a node. The notebook's way holds the whole set in each process (pandas -> ``Dataset.from_pandas``).

Each simulated worker is a fresh process that opens the set, builds ce-ray's length-grouped batch
sampler over it and reads every batch of its shard (Accelerate deals whole batches to the ranks, so
rank r reads batches r, r+N, ...). Printed per worker: growth of private memory (RssAnon: what
each worker holds alone) and of file-backed resident memory (RssFile: shared page cache).

    python bench/worker_memory.py                      # 100k NLI rows (nli/train repeated), 2 workers
    python bench/worker_memory.py --rows 400000 --workers 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "nli" / "train.parquet"


def _mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _worker(mode: str, source: str, rank: int, world: int, batch: int, out) -> None:
    import datasets
    import pandas as pd

    from ce_ray.training.batching import LengthGroupedBatchSampler
    from ce_ray.data.prepare import load_prepared

    datasets.disable_progress_bars()
    anon0, file0 = _mib("RssAnon"), _mib("RssFile")
    if mode == "ce-ray (memory-mapped Arrow)":
        dataset = load_prepared(source)
    else:
        dataset = datasets.Dataset.from_pandas(pd.read_parquet(source), preserve_index=False)
    sampler = LengthGroupedBatchSampler(dataset, batch_size=batch, drop_last=True, valid_label_columns=["label"])
    rows = 0
    for i, indices in enumerate(sampler):
        if i % world == rank:
            rows += len(dataset[indices]["label"])
    out.put((mode, rank, rows, _mib("RssAnon") - anon0, _mib("RssFile") - file0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="NLI parquet (premise, hypothesis, label)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="per-worker batch size")
    args = parser.parse_args()

    import pandas as pd

    from ce_ray.config import load_job
    from ce_ray.data.prepare import prepare_split

    tmp = Path(tempfile.mkdtemp(prefix="ce_ray_mem_"))
    base = pd.read_parquet(args.data)
    frame = pd.concat([base] * (args.rows // len(base) + 1), ignore_index=True).head(args.rows)
    source = tmp / "train.parquet"
    frame.to_parquet(source)
    job = load_job(None, ["task=nli", f"data.train={source}", f"run.output_dir={tmp / 'run'}"])
    split = prepare_split(job, "train")
    arrow_mib = sum(f.stat().st_size for f in Path(split.uri).rglob("*.arrow")) / 2**20

    ctx = mp.get_context("spawn")
    results = []
    for mode, src in (("ce-ray (memory-mapped Arrow)", split.uri), ("notebook (private copy)", str(source))):
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(mode, src, r, args.workers, args.batch, queue)) for r in range(args.workers)]
        for p in procs:
            p.start()
        results += [queue.get() for _ in procs]
        for p in procs:
            p.join()

    print(f"\n{args.rows:,} training rows, Arrow files {arrow_mib:.0f} MiB; {args.workers} workers, each reading its shard")
    print(f"{'layout':32} {'rank':>4} {'rows read':>10} {'private MiB (RssAnon)':>22} {'shared MiB (RssFile)':>21}")
    for mode, rank, rows, anon, file in sorted(results):
        print(f"{mode:32} {rank:>4} {rows:>10,} {anon:>22.0f} {file:>21.0f}")


if __name__ == "__main__":
    main()
