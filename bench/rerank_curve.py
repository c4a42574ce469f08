"""Why the CPU budget does not reach the rerank goal: test NDCG@10 against training pairs seen, per lever.

Each lever is one ``ce-ray train`` run of ``jobs/rerank_train_offline.yaml`` on all qa/train questions, stopped
after ``--pairs`` training pairs (``train.max_steps``), with a checkpoint every ``--pairs / --points`` pairs.
The run picks nothing: afterwards each kept checkpoint is scored once on the **test half** of qa/dev (the last
325 queries) to draw the curve. This is a diagnostic plot, never a model choice (runs choose on the tune half).
The zero-shot bi-encoder the cross-encoder starts from (cosine) is scored on the same test queries.

    python bench/rerank_curve.py                             # the four levers below, 8k pairs each, 4 points
    python bench/rerank_curve.py --levers base lr_1.5e-4 --pairs 16000 --points 8

Levers (each is the base plus its overrides):

- ``base``: the search best of 2026-11-29: BCE (pos_weight auto), 3 hard negatives (top of the bi-encoder's
  candidates), lr 4.1e-5, batch 64, max_length 192, bf16 where the CPU has it (``train.precision: auto``);
- ``random_5``: 5 negatives sampled at random among the top 100 candidates (sentence-transformers' reranker
  examples), the rest as base;
- ``lr_1.5e-4``: a larger learning rate for the fresh scoring head;
- ``lambda_7``: LambdaLoss over lists of 1 positive + 7 hard negatives (listwise, more negatives a query);
  a batch is 8 lists, so a step sees 64 pairs as in the other levers;
- ``maxlen_128``: cheaper pairs (the dev negatives are short: 90% under 50 tokens);
- ``together``: LambdaLoss over 1 positive + 7 hard negatives, max_length 128 and a peak rate of 8e-5;
- ``together_3``: the same over lists of 1 positive + 3 hard negatives, 16 lists a step: as many pairs a step,
  twice the questions for the same budget.

``--data train train+extra`` adds the data lever: each lever on qa/train alone and on qa/train + qa/extra (two
sources of one job, mined together).

Prints a Markdown table: per lever, test NDCG@10 / MRR@10 at each point, training samples/s and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

BASE = ["train.loss=BinaryCrossEntropyLoss", "train.learning_rate=4.1e-5", "train.batch_size=64", "model.max_length=192",
        "data.negatives.num=3", "data.negatives.sampling=top"]  # fmt: skip
LEVERS = {
    "base": [],
    "random_5": ["data.negatives.num=5", "data.negatives.sampling=random"],
    "lr_1.5e-4": ["train.learning_rate=1.5e-4"],
    "lambda_7": ["train.loss=LambdaLoss", "data.negatives.num=7", "train.batch_size=8"],  # 8 lists x 8 = 64 pairs
    "maxlen_128": ["model.max_length=128"],
    # the three levers together at the peak rate that does not stall (bench/README.md)
    "together": ["train.loss=LambdaLoss", "data.negatives.num=7", "train.batch_size=8", "model.max_length=128",
                 "train.learning_rate=8e-5"],
    # the same with lists of 1 + 3 (16 lists a step, still 64 pairs): twice the distinct questions for the pairs seen
    "together_3": ["train.loss=LambdaLoss", "data.negatives.num=3", "train.batch_size=16", "model.max_length=128",
                   "train.learning_rate=8e-5"],
}


# The data lever: qa/train alone, or qa/train + qa/extra (2.7x the questions) as two sources of one job
QA = "columns: {query: question, positive: answer}"
DATA_SETS = {
    "train": f"data.train=[{{path: {DATA / 'qa/train.parquet'}, {QA}}}]",
    "train+extra": f"data.train=[{{path: {DATA / 'qa/train.parquet'}, {QA}}}, {{path: {DATA / 'qa/extra.parquet'}, {QA}}}]",
}


def lever_job(name: str, pairs: int, points: int, out: Path, extra: list[str], data: str = "train"):
    from ce_ray.config import load_job

    batch = 64
    steps = max(1, pairs // batch)
    every = max(1, steps // points)
    overrides = [
        DATA_SETS[data],
        f"data.eval.path={DATA / 'qa/dev.parquet'}", "data.eval.select=120",
        f"data.test.path={DATA / 'qa/dev.parquet'}", "data.test.offset=325",
        f"train.max_steps={steps}", f"run.checkpoint_every={every}", f"run.keep_checkpoints={points + 2}",
        f"run.output_dir={out / name / data}", f"run.name={name}", "run.final=last", "scaling.cpus_per_worker=2",
        f"data.cache_dir={out / 'data'}",  # levers with the same mining settings mine once
        *BASE, *LEVERS[name], *extra,
    ]  # fmt: skip
    return load_job(REPO / "jobs/rerank_train_offline.yaml", overrides)


def fused(job, model_dir: str) -> dict:
    """The model fused with the retriever: the weight fitted on the eval (tune) queries, then the test half once."""
    from ce_ray.data.prepare import prepare_split
    from ce_ray.modeling import load_for_inference
    from ce_ray.quality import fuse_with_retriever

    out = fuse_with_retriever(job, load_for_inference(model_dir), prepare_split(job, "eval"), prepare_split(job, "test"))
    return {**out["fusion"], "pure_test": out["pure_test"]}


def run_lever(name: str, pairs: int, points: int, out: Path, extra: list[str], data: str = "train") -> dict:
    from ce_ray.quality import evaluate
    from ce_ray.training import run_training
    from ce_ray.training.checkpoint import staged_model

    batch = 64
    job = lever_job(name, pairs, points, out, extra, data)
    started = time.time()
    outcome = run_training(job)
    wall = time.time() - started
    summary = outcome.summary
    curve, fusion = [], None
    checkpoints = sorted(outcome.result.best_checkpoints, key=lambda c: c[1].get("step", 0))
    for checkpoint, metrics in checkpoints:
        step = int(metrics.get("step", 0))
        with staged_model(checkpoint) as model_dir:
            test = evaluate(job, model_dir, "test")
            if checkpoint is checkpoints[-1][0]:
                fusion = fused(job, model_dir)
        curve.append({"step": step, "pairs": step * batch, "eval_ndcg@10": metrics.get("eval_ndcg@10"),
                      "test_ndcg@10": test["ndcg@10"], "test_mrr@10": test["mrr@10"]})  # fmt: skip
        print(f"{name}: step {step} ({step * batch} pairs): test NDCG@10 {test['ndcg@10']:.4f}", flush=True)
    return {
        "lever": name, "data": data, "overrides": LEVERS[name], "curve": curve, "wall_s": wall, "fused_last": fusion,
        "samples_per_second": summary.get("train_samples_per_second"), "train_rows": summary.get("train_rows"),
        "baseline_test": (summary.get("baseline") or {}).get("test"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", nargs="+", default=["base", "random_5", "lr_1.5e-4", "lambda_7"], choices=list(LEVERS))
    parser.add_argument("--pairs", type=int, default=8000, help="training pairs seen per run (steps x batch 64)")
    parser.add_argument("--points", type=int, default=4, help="checkpoints (curve points) per run")
    parser.add_argument("--out", default="runs/bench-curve")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for every run")
    parser.add_argument("--data", nargs="+", default=["train"], choices=list(DATA_SETS),
                        help="training data per lever: qa/train alone and/or qa/train + qa/extra (two sources)")
    parser.add_argument("--fuse-model", help="only fuse this model dir with the retriever (the first lever's job)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if args.fuse_model:
        report = fused(lever_job(args.levers[0], args.pairs, args.points, out, args.overrides, args.data[0]), args.fuse_model)
        print(json.dumps(report, indent=2))
        return
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.levers:
        for data in args.data:
            results.append(run_lever(name, args.pairs, args.points, out, args.overrides, data))
        (out / "curve.json").write_text(json.dumps(results, indent=2))

    base = next((r["baseline_test"] for r in results if r["baseline_test"]), None)
    print(f"\ntest half of qa/dev (325 queries); zero-shot bi-encoder: "
          + (f"NDCG@10 {base['ndcg@10']:.4f}, MRR@10 {base['mrr@10']:.4f}" if base else "n/a"))  # fmt: skip
    pairs = sorted({p["pairs"] for r in results for p in r["curve"]})
    print("| lever | " + " | ".join(f"{p:,} pairs" for p in pairs) + " | samples/s | wall |")
    print("|---|" + "---:|" * (len(pairs) + 2))
    for r in results:
        at = {p["pairs"]: p for p in r["curve"]}
        cells = [f"{at[p]['test_ndcg@10']:.3f} / {at[p]['test_mrr@10']:.3f}" if p in at else "" for p in pairs]
        sps = f"{r['samples_per_second']:.1f}" if r["samples_per_second"] else "n/a"
        print(f"| {r['lever']} ({r['data']}) | " + " | ".join(cells) + f" | {sps} | {r['wall_s'] / 60:.1f} min |")
    print("(cells: test NDCG@10 / MRR@10 of the checkpoint at that many training pairs)")
    for r in results:
        if r.get("fused_last"):
            f = r["fused_last"]
            print(f"{r['lever']} ({r['data']}), last checkpoint fused with the retriever (weight {f['weight']:g} fitted on "
                  f"the eval queries): test NDCG@10 {f['test']['ndcg@10']:.4f} (pure {f['pure_test']['ndcg@10']:.4f})")


if __name__ == "__main__":
    main()
