"""Training throughput: the notebook's way vs ``ce-ray train`` on 1 and 2 workers.

Same model, data, global batch and precision everywhere; prints one table of training samples/s
(time spent in training steps: evaluation and checkpointing excluded in every column) and ratios.

    python bench/train_throughput.py                       # CPU: bundled MiniLM-L6, real NLI pairs
    python bench/train_throughput.py --rows 4096 --batch 64
    python bench/train_throughput.py --device cuda --precision bf16 --workers 1   # on a GPU machine

(a) notebook: ``CrossEncoderTrainer`` alone in this process (all cores / the GPU).
(b) ce-ray:   ``run_training`` on a local Ray: 1 worker holding all cores (or the GPU) with the
              notebook's plain random batches (Ray's own cost), then as shipped (length-grouped
              batches): 1 worker, and 2 workers with half the cores each (DDP, gloo).
Goals on the 2-core CPU machine: (b, 1 worker) >= 0.9x (a) (issue 2) and >= 1.0x (issue 6).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "nli"


def notebook_way(args, train_path: str, model_name: str) -> float:
    """The notebook: one process, CrossEncoderTrainer, no Ray. Returns samples/s of the training steps."""
    import pandas as pd
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import CrossEntropyLoss

    from ce_ray.modeling import resolve_model_name
    from ce_ray.training.instrument import _Timer

    torch.manual_seed(12)
    model = CrossEncoder(resolve_model_name(model_name), num_labels=3, device=args.device,
                         model_kwargs={"ignore_mismatched_sizes": True})  # a head of another size is replaced
    data = Dataset.from_pandas(pd.read_parquet(train_path))
    targs = CrossEncoderTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench_nb_"),
        per_device_train_batch_size=args.batch,
        num_train_epochs=1,
        learning_rate=5e-5,
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        use_cpu=args.device == "cpu",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=12,
    )
    timer = _Timer()
    trainer = CrossEncoderTrainer(model=model, args=targs, train_dataset=data, loss=CrossEntropyLoss(model), callbacks=[timer])
    trainer.train()
    if args.device == "cuda":
        print(f"  notebook peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", file=sys.stderr)
    return trainer.state.global_step * args.batch / timer.step_seconds


def ce_ray_way(
    args, train_path: str, eval_path: str, model_name: str, workers: int, cpus: float, grouped: bool = True, extra=()
) -> tuple[float, dict]:
    from ce_ray.config import load_job
    from ce_ray.training import run_training

    out = tempfile.mkdtemp(prefix=f"bench_ce{workers}_")
    job = load_job(
        None,
        [
            "task=nli",
            f"model.name={model_name}",
            f"data.train={train_path}",
            f"data.eval={eval_path}",
            f"train.batch_size={args.batch}",
            "train.learning_rate=5e-5",
            f"train.precision={args.precision}",
            f"scaling.num_workers={workers}",
            f"scaling.cpus_per_worker={cpus}",
            f"scaling.use_gpu={str(args.device == 'cuda').lower()}",
            f"run.output_dir={out}",
            "run.checkpoint_every=100000",  # evaluate/checkpoint only at the end
            f"train.group_by_length={str(grouped).lower()}",
            *extra,
        ],
    )
    summary = run_training(job).summary
    return summary["train_samples_per_second"], summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled:all-MiniLM-L6-v2")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with train.parquet and dev.parquet (NLI)")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="ce-ray worker counts (default: 1 2 on CPU, 1 on GPU)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-batches row (Ray's own cost)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the unmeasured warm-up run (for a check that the script works, not its numbers)")
    args = parser.parse_args()

    import pandas as pd
    import ray

    cores = os.cpu_count() or 1
    work = tempfile.mkdtemp(prefix="bench_data_")
    train_path = os.path.join(work, "train.parquet")
    eval_path = os.path.join(work, "dev.parquet")
    pd.read_parquet(Path(args.data) / "train.parquet").head(args.rows).to_parquet(train_path)
    pd.read_parquet(Path(args.data) / "dev.parquet").head(64).to_parquet(eval_path)
    workers = args.workers or ([1, 2] if args.device == "cpu" else [1])
    memory = []

    rows = [("notebook: CrossEncoderTrainer, 1 process", notebook_way(args, train_path, args.model), None)]
    rss_notebook = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Ray's first minute (dashboard, agents, first worker processes) competes for the cores: warm up
    # with a few steps that are not measured, so every row sees a running Ray.
    cpus = float(cores) if args.device == "cpu" else 1.0
    if args.warmup:
        ce_ray_way(args, train_path, eval_path, args.model, 1, cpus, extra=["train.max_steps=4"])
    # The same batches as the notebook first (Ray's own overhead), then ce-ray as shipped.
    if not args.no_plain:
        sps, summary = ce_ray_way(args, train_path, eval_path, args.model, 1, cpus, grouped=False)
        rows.append((f"ce-ray train, 1 worker x {cpus:g} CPU, plain batches", sps, summary["steps_per_worker"]))
    for n in workers:
        cpus = max(1.0, cores / n) if args.device == "cpu" else 1.0
        sps, summary = ce_ray_way(args, train_path, eval_path, args.model, n, cpus)
        rows.append((f"ce-ray train, {n} worker(s) x {cpus:g} CPU", sps, summary["steps_per_worker"]))
        memory.append((n, summary["peak_rss_mib_per_worker"], summary["peak_gpu_mem_gib_per_worker"]))
    ray.shutdown()

    base = rows[0][1]
    print(f"\nmodel {args.model}  rows {args.rows}  global batch {args.batch}  precision {args.precision}  device {args.device}  cores {cores}")
    print(f"{'way':56} {'samples/s':>10} {'vs notebook':>12}  steps/worker")
    for name, sps, steps in rows:
        print(f"{name:56} {sps:10.1f} {sps / base:11.2f}x  {steps if steps else ''}")
    print(f"peak host RSS: notebook process {rss_notebook:.0f} MiB", end="")
    for n, rss, gpu in memory:
        gpu_text = f", GPU {[round(g, 2) for g in gpu]} GiB" if any(g is not None for g in gpu) else ""
        print(f"; ce-ray {n} worker(s): {rss} MiB per worker{gpu_text}", end="")
    print()
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "rows": args.rows, "batch": args.batch, "precision": args.precision, "device": args.device,
            "results": [{"way": name, "samples_per_second": sps, "vs_notebook": sps / base, "steps_per_worker": steps}
                        for name, sps, steps in rows],
            "notebook_peak_rss_mib": rss_notebook,
            "ce_ray_memory": [{"workers": n, "peak_rss_mib": rss, "peak_gpu_gib": gpu} for n, rss, gpu in memory],
        }, indent=2))


if __name__ == "__main__":
    main()
