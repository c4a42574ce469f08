"""Does the search find a better model than the notebook's defaults, on the same budget?

For each task, on the real data in ../shared/data with the bundled all-MiniLM-L6-v2:

1. the notebook's recipe, trained once (``ce-ray train``) and scored on the test rows;
2. ``ce-ray tune`` with at most 8 trials (Optuna TPE + ASHA, seeded with the recipe), every trial
   on the same data budget; its best model scored on the same test rows;
3. for rerank, also the zero-shot bi-encoder (cosine similarity) the cross-encoder starts from, as
   every rerank run now scores it (``eval.baseline``), and the refit of the best trial on all the
   training questions when the job has ``tune.refit: true`` (the shipped rerank search does).

    python bench/tune_quality.py --task nli       # 10k rows, 1 epoch per trial; test = nli/test (2,950 pairs)
    python bench/tune_quality.py --task rerank    # 1k qa/train pairs + mined negatives; dev split in halves:
                                                  # first 325 queries tune (120 of them), last 325 test

Prints one table per task. Bars (from the brief): nli test accuracy 0.617 for the recipe;
rerank zero-shot bi-encoder MRR@10 0.817 / NDCG@10 0.853 on all of qa/dev.
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


def recipe_and_search(job_file: str, overrides: list[str], out: Path, recipe: list[str], reuse_recipe: bool = False) -> dict:
    from ce_ray.config import load_job
    from ce_ray.tasks import TASKS
    from ce_ray.training import run_training
    from ce_ray.tuning import run_tuning

    tune_job = load_job(REPO / job_file, overrides + [f"run.output_dir={out / 'tune'}"])
    task = TASKS[tune_job.task]

    started = time.time()
    recipe_job = load_job(REPO / job_file, overrides + recipe + [f"run.output_dir={out / 'recipe'}", "run.name=recipe"])
    finished = out / "recipe" / "summary.json"
    if reuse_recipe and finished.exists():  # the recipe run of an earlier bench with the same --out
        summary = json.loads(finished.read_text())
        recipe_s = summary["wall_time_s"]
        print(f"reusing the recipe run in {finished.parent}")
    else:
        summary = run_training(recipe_job).summary  # scores data.test with the final model
        recipe_s = time.time() - started
    recipe_test = summary["metrics_test"]

    started = time.time()
    outcome = run_tuning(tune_job)
    search_s = time.time() - started
    best = outcome.best
    refit = best.get("refit")
    return {
        "task": tune_job.task,
        "metric": task.primary_metric,
        "recipe": {"loss": summary["loss"], "lr": recipe_job.train.learning_rate, "batch": recipe_job.train.batch_size,
                   "eval": summary["metrics_after"], "test": recipe_test, "seconds": recipe_s},
        "search": {"trials": best["num_trials"], "stopped_early": best["trials_stopped_early"],
                   "best": {"loss": best["loss"], "params": best["params"], "eval": best["value"]},
                   "test": best["trial_quality"]["model"]["test"] or {},
                   "seconds": search_s - (refit["wall_time_s"] if refit else 0)},
        "refit": {"rows": refit["train_rows"], "exported": refit["chosen"], "eval": refit["eval_value"],
                  "test": refit["quality"]["model"]["test"] or {}, "seconds": refit["wall_time_s"]} if refit else None,
        "baseline_test": (best.get("baseline") or {}).get("test"),
        "fused": best.get("fusion"),  # best/ fused with the retriever (weight fitted on eval), reported apart
    }


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
    args = parser.parse_args()
    out = Path(args.out).resolve() / args.task
    overrides = [f"tune.num_samples={args.trials}", *args.overrides]
    if args.task == "nli":
        overrides += [f"data.train.path={DATA / 'nli/train.parquet'}", f"data.eval.path={DATA / 'nli/dev.parquet'}",
                      f"data.test.path={DATA / 'nli/test.parquet'}"]
        result = recipe_and_search("jobs/nli_tune.yaml", overrides, out,
                                   ["train.learning_rate=5e-5", "train.batch_size=64", "train.loss=CrossEntropyLoss"], args.reuse_recipe)
        bars = "bar: recipe on nli/test 0.617 accuracy (brief)"
    else:
        # The shipped search (1,000 questions a source and trial, qa/train + qa/extra, + 7 mined negatives each;
        # refit on all 26,790), trials evaluated on the first 325 dev queries; the test half (last 325) is untouched.
        overrides = [f"data.train.0.path={DATA / 'qa/train.parquet'}", f"data.train.1.path={DATA / 'qa/extra.parquet'}",
                     f"data.eval.path={DATA / 'qa/dev.parquet'}", f"data.test.path={DATA / 'qa/dev.parquet'}", *overrides]
        result = recipe_and_search("jobs/rerank_tune.yaml", overrides, out,
                                   ["train.learning_rate=2e-5", "train.batch_size=64", "train.loss=BinaryCrossEntropyLoss"], args.reuse_recipe)
        result["zero_shot_bi_encoder_test"] = result["baseline_test"] or zero_shot_bi_encoder(DATA / "qa/dev.parquet", offset=325)
        bars = "bar: zero-shot bi-encoder MRR@10 0.817 / NDCG@10 0.853 on all of qa/dev (brief)"

    metric = result["metric"]
    print(f"\n{result['task']}: test {metric} (and the rest), same data budget per run; {bars}")
    print(f"{'model':56} {'test ' + metric:>14}  other test metrics")
    r, s = result["recipe"], result["search"]
    others = lambda m: ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k != metric)  # noqa: E731
    if "zero_shot_bi_encoder_test" in result:
        z = result["zero_shot_bi_encoder_test"]
        print(f"{'zero-shot bi-encoder (cosine), bundled MiniLM-L6':56} {z[metric]:14.4f}  {others(z)}")
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
    print(f"wall time: recipe {r['seconds'] / 60:.1f} min, search {s['seconds'] / 60:.1f} min"
          + (f", refit {f['seconds'] / 60:.1f} min" if f else ""))
    (out / "quality.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
