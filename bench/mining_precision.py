"""Mining in bf16 against fp32 (``data.negatives.precision``): time, and how many negatives change, on real QA pairs.

Mines hard negatives for the first ``--questions`` questions of qa/train (or any source) on the driver path,
sentence-transformers' ``mine_hard_negatives``, once per precision, with the shipped rerank search's settings
(7 negatives, ``sampling: top``, the default filters). Each precision runs in a fresh process, so neither warms
the other's caches.
Printed: seconds, texts embedded per second, and the share of each query's fp32 negatives that the other precision
finds too (1.0 = the same set).

    python bench/mining_precision.py                       # 2,000 questions of qa/train, fp32 vs bf16
    python bench/mining_precision.py --questions 9907
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def child(path: str, questions: int, precision: str, model: str) -> None:
    from ce_ray.config import load_job
    from ce_ray.data import load_split, mine_negatives, rerank_groups

    job = load_job(None, [
        "task=rerank", "train.loss=LambdaLoss", "data.negatives.num=7", "data.negatives.sampling=top",
        f"data.train={{path: {path}, columns: {{query: question, positive: answer}}, select: {questions}}}",
        f"data.negatives.model={model}", f"data.negatives.precision={precision}",
    ])  # fmt: skip
    groups = rerank_groups(load_split(job, "train"))
    texts = len(groups.queries) + len({d for docs in groups.docs for d in docs})
    start = time.perf_counter()
    mined = mine_negatives(groups, job.data.negatives)
    seconds = time.perf_counter() - start
    negatives = [[d for d, lab in zip(docs, labels) if lab <= 0] for docs, labels in zip(mined.docs, mined.labels)]
    print(json.dumps({"seconds": seconds, "texts": texts, "negatives": negatives}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=str(DATA / "qa" / "train.parquet"), help="(question, answer) pairs")
    parser.add_argument("--questions", type=int, default=2000)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "auto"])
    parser.add_argument("--model", default="bundled:all-MiniLM-L6-v2")
    parser.add_argument("--child", metavar="PRECISION", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.path, args.questions, args.child, args.model)
        return
    runs = {}
    for precision in args.precisions:
        cmd = [sys.executable, __file__, "--path", args.path, "--questions", str(args.questions), "--model", args.model,
               "--child", precision]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            sys.exit(f"{precision} failed:\n{proc.stderr[-4000:]}")
        runs[precision] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {precision}: {runs[precision]['seconds']:.1f} s", file=sys.stderr, flush=True)

    first = args.precisions[0]
    print(f"\n{args.questions:,} questions of {Path(args.path).name}, 7 negatives each (sampling top), {args.model}; "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(f"| precision | seconds | texts embedded/s | negatives also found by {first} | queries with the same set |")
    print("|---|---:|---:|---:|---:|")
    for precision, run in runs.items():
        shares = [len(set(a) & set(b)) / len(a) for a, b in zip(runs[first]["negatives"], run["negatives"]) if a]
        same = sum(set(a) == set(b) for a, b in zip(runs[first]["negatives"], run["negatives"])) / len(run["negatives"])
        print(f"| {precision} | {run['seconds']:.1f} | {run['texts'] / run['seconds']:,.0f} | "
              f"{sum(shares) / len(shares):.3f} | {same:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
