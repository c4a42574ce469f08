"""Does the search find a better model than the notebook's defaults, on the same budget?

For each task, on the real data in ../shared/data with the bundled all-MiniLM-L6-v2:

1. the notebook's recipe, trained once (``ce-ray train``) and scored on the test rows;
2. ``ce-ray tune`` with at most 8 trials (Optuna TPE + ASHA, seeded with the recipe), every trial
   on the same data budget; its best model scored on the same test rows;
3. for rerank, also the zero-shot bi-encoder (cosine similarity) the cross-encoder starts from, as
   every rerank run now scores it (``eval.baseline``), and the refit of the best trial on all the
   training questions when the job has ``tune.refit: true`` (the shipped rerank search does).

    python bench/tune_quality.py --task nli       # 10k rows, 1 epoch per trial; test = nli/test (2,950 pairs)
    python bench/tune_quality.py --task rerank    # jobs/rerank_tune.yaml: 1,000 questions of qa/train and 1,000 of
                                                  # qa/extra a trial, refit on all 26,790; dev split in halves:
                                                  # first 325 queries tune, last 325 test (scored once)
    python bench/tune_quality.py --task rerank --from-run runs/rerank-tune --no-recipe
                                                  # the table of a finished `ce-ray tune jobs/rerank_tune.yaml`

Prints one table per task, with wall times ("search" counts from the start of ``run_tuning``: the data
preparation, the search's mining and the refit's, is in it). Bars (from the brief): nli test accuracy 0.617 for
the recipe; rerank: the zero-shot bi-encoder's NDCG@10 0.846 on the test half of qa/dev.
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


def recipe_run(job_file: str, overrides: list[str], out: Path, recipe: list[str], reuse_recipe: bool = False) -> dict | None:
    """The notebook's recipe, trained once on the search's data budget (None with ``--no-recipe``)."""
    from ce_ray.config import load_job
    from ce_ray.training import run_training

    recipe_job = load_job(REPO / job_file, overrides + recipe + [f"run.output_dir={out / 'recipe'}", "run.name=recipe"])
    finished = out / "recipe" / "summary.json"
    started = time.time()
    if reuse_recipe and finished.exists():  # the recipe run of an earlier bench with the same --out
        summary = json.loads(finished.read_text())
        seconds = summary["wall_time_s"]
        print(f"reusing the recipe run in {finished.parent}")
    else:
        summary = run_training(recipe_job).summary  # scores data.test with the final model
        seconds = time.time() - started
    return {"loss": summary["loss"], "lr": recipe_job.train.learning_rate, "batch": recipe_job.train.batch_size,
            "eval": summary["metrics_after"], "test": summary["metrics_test"], "seconds": seconds}


def search_result(best: dict) -> dict:
    """The rows of the table from a finished search's ``best.json`` (``ce-ray tune``'s, or this bench's own)."""
    from ce_ray.tasks import TASKS

    refit = best.get("refit")
    return {
        "task": best["job"]["task"],
        "metric": TASKS[best["job"]["task"]].primary_metric,
        "search": {"trials": best["num_trials"], "stopped_early": best["trials_stopped_early"],
                   "best": {"loss": best["loss"], "params": best["params"], "eval": best["value"]},
                   "test": best["trial_quality"]["model"]["test"] or {},
                   "seconds": best["wall_time_s"] - (refit["wall_time_s"] if refit else 0)},
        "refit": {"rows": refit["train_rows"], "exported": refit["chosen"], "eval": refit["eval_value"],
                  "test": refit["quality"]["model"]["test"] or {}, "seconds": refit["wall_time_s"]} if refit else None,
        "baseline_test": (best.get("baseline") or {}).get("test"),
        "fused": best.get("fusion"),  # best/ fused with the retriever (weight fitted on eval), reported apart
    }


def run_search(job_file: str, overrides: list[str], out: Path) -> dict:
    """``ce-ray tune`` of the shipped job (its search, and its refit where it has one) under ``out/tune``."""
    from ce_ray.config import load_job
    from ce_ray.tuning import run_tuning

    outcome = run_tuning(load_job(REPO / job_file, overrides + [f"run.output_dir={out / 'tune'}"]))
    return outcome.best


def zero_shot_bi_encoder(test_path: Path, offset: int) -> dict:
    """The bi-encoder the cross-encoder starts from, used as a ranker (cosine), on the same test queries."""
    import pandas as pd
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import RerankingEvaluator

    from ce_ray.modeling import resolve_model_name

    rows = pd.read_parquet(test_path).iloc[offset:]
    samples = [{"query": q, "positive": list(p), "negative": list(n)} for q, p, n in zip(rows["query"], rows["positive"], rows["negative"])]
    model = SentenceTransformer(resolve_model_name("bundled:all-MiniLM-L6-v2"), device="cpu")
    metrics = RerankingEvaluator(samples, at_k=10, write_csv=False)(model)
    return {k: float(v) for k, v in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["nli", "rerank"], required=True)
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--reuse-recipe", action="store_true",
                        help="reuse a finished recipe run under --out (its summary.json) instead of training it again")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for both runs")
    parser.add_argument("--from-run", metavar="DIR",
                        help="a finished `ce-ray tune` of the shipped job (its run.output_dir): report its best.json "
                             "instead of running the search")
    parser.add_argument("--no-recipe", action="store_true", help="leave out the recipe's row (no training run)")
    args = parser.parse_args()
    out = Path(args.out).resolve() / args.task
    overrides = [f"tune.num_samples={args.trials}", *args.overrides]
    if args.task == "nli":
        job_file = "jobs/nli_tune.yaml"
        overrides += [f"data.train.path={DATA / 'nli/train.parquet'}", f"data.eval.path={DATA / 'nli/dev.parquet'}",
                      f"data.test.path={DATA / 'nli/test.parquet'}"]
        recipe = ["train.learning_rate=5e-5", "train.batch_size=64", "train.loss=CrossEntropyLoss"]
        bars = "bar: recipe on nli/test 0.617 accuracy (brief)"
    else:
        # The shipped search (1,000 questions a source and trial, qa/train + qa/extra, + 3 mined negatives each;
        # refit on all 26,790), trials evaluated on the first 325 dev queries; the test half (last 325) is untouched.
        job_file = "jobs/rerank_tune.yaml"
        overrides = [f"data.train.0.path={DATA / 'qa/train.parquet'}", f"data.train.1.path={DATA / 'qa/extra.parquet'}",
                     f"data.eval.path={DATA / 'qa/dev.parquet'}", f"data.test.path={DATA / 'qa/dev.parquet'}", *overrides]
        recipe = ["train.learning_rate=2e-5", "train.batch_size=64", "train.loss=BinaryCrossEntropyLoss"]
        bars = "bar: zero-shot bi-encoder NDCG@10 0.846 on the test half of qa/dev (brief)"
    if args.from_run:  # a finished `ce-ray tune` of the shipped job: read its best.json, run nothing
        result = search_result(json.loads((Path(args.from_run) / "best.json").read_text()))
    else:
        result = search_result(run_search(job_file, overrides, out))
    result["recipe"] = None if args.no_recipe else recipe_run(job_file, overrides, out, recipe, args.reuse_recipe)
    if args.task == "rerank":
        result["zero_shot_bi_encoder_test"] = result["baseline_test"] or zero_shot_bi_encoder(DATA / "qa/dev.parquet", offset=325)

    metric = result["metric"]
    print(f"\n{result['task']}: test {metric} (and the rest), same data budget per run; {bars}")
    print(f"{'model':56} {'test ' + metric:>14}  other test metrics")
    r, s = result["recipe"], result["search"]
    others = lambda m: ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k != metric)  # noqa: E731
    if "zero_shot_bi_encoder_test" in result:
        z = result["zero_shot_bi_encoder_test"]
        print(f"{'zero-shot bi-encoder (cosine), bundled MiniLM-L6':56} {z[metric]:14.4f}  {others(z)}")
    if r:
        label = f"recipe: {r['loss']} lr {r['lr']:g} batch {r['batch']}"
        print(f"{label:56} {r['test'][metric]:14.4f}  {others(r['test'])}")
    best = s["best"]
    label = f"search best of {s['trials']} ({s['stopped_early']} stopped): {best['loss']} lr {best['params'].get('train.learning_rate', 0):.2g} batch {best['params'].get('train.batch_size', '')}"
    print(f"{label:56} {s['test'].get(metric, float('nan')):14.4f}  {others(s['test'])}")
    f = result.get("refit")
    if f:
        label = f"refit of the best on {f['rows']} rows ({'exported' if f['exported'] else 'not exported'})"
        print(f"{label:56} {f['test'].get(metric, float('nan')):14.4f}  {others(f['test'])}")
    fused = result.get("fused")
    if fused and fused.get("test"):
        label = f"fused: best/ + bi-encoder (weight {fused['weight']:g} fitted on eval)"
        print(f"{label:56} {fused['test'].get(metric, float('nan')):14.4f}  {others(fused['test'])}")
    times = ([f"recipe {r['seconds'] / 60:.1f} min"] if r else []) + [f"search {s['seconds'] / 60:.1f} min"]
    times += [f"refit {f['seconds'] / 60:.1f} min"] if f else []
    print("wall time: " + ", ".join(times))
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
