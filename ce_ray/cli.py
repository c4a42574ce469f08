"""The ``ce-ray`` command: each subcommand parses its arguments, loads the job and calls one function.

Examples::

    ce-ray train jobs/nli_train.yaml           # Ray's and the workers' logs: runs/nli/logs/console.log
    ce-ray train jobs/nli_train.yaml -v        # ... printed here as well
    ce-ray train jobs/rerank_train.yaml --set scaling.num_workers=4 --set scaling.use_gpu=true
    ce-ray tune jobs/rerank_tune.yaml --set tune.num_samples=32
    ce-ray evaluate --model runs/nli/final --task nli --data some/test.parquet
    ce-ray predict --model runs/nli/final "A man is eating pizza" "A man eats something"
    ce-ray rank --model runs/rerank/final --query "How many people live in Berlin?" doc1 doc2
    ce-ray serve --model runs/rerank-tune/best
    ce-ray serve --model legal=runs/legal/best --model medical=runs/medical/best
    ce-ray serve --model runs/next/best --update           # roll a new model into the running server; --rollback
    ce-ray export runs/rerank-tune/best --backend onnx --quantize qint8   # then serve.backend=onnx
    ce-ray validate jobs/nli_train.yaml        # check a job without running it
    ce-ray demo                                # offline end-to-end demo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from ce_ray import console
from ce_ray.config import ConfigError, JobConfig, describe_keys, load_job

__all__ = ["main"]

EPILOG = __doc__.split("Examples::", 1)[1]
VERBOSE_HELP = (
    "train/tune/demo: print Ray's, Hugging Face's and the workers' output here instead of only into "
    "<run.output_dir>/logs/console.log; evaluate/predict/rank: print the libraries' INFO logging and "
    "progress bars before the result; -vv: debug logging as well"
)
# The commands that print one result (JSON) and nothing else unless --verbose.
QUIET = ("evaluate", "predict", "rank")


def _add_job_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("job", nargs=None if required else "?", help="job YAML file (see jobs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key, e.g. --set train.learning_rate=2e-5 (repeatable)",
    )


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _cmd_train(args: argparse.Namespace) -> int:
    job = load_job(args.job, [*args.overrides, *(["run.restart=true"] if args.restart else [])])
    from ce_ray.training import run_training  # after the config: a bad one fails before ~5 s of imports

    with console.session(f"train {args.job}", job.run.output_dir, verbose=args.verbose > 0):
        outcome = run_training(job)
        console.say(console.train_summary(outcome.summary))
        console.say(f"summary:     {outcome.summary_path}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    job = load_job(args.job, [*args.overrides, *(["run.restart=true"] if args.restart else [])])
    from ce_ray.tuning import run_tuning  # after the config, as in train

    with console.session(f"tune {args.job}", job.run.output_dir, verbose=args.verbose > 0):
        outcome = run_tuning(job)
        console.say(console.tune_summary({**outcome.best, "report_dir": outcome.report_dir}))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    if args.keys:
        for key, default, description in describe_keys():
            print(f"{key:38} {default:28} {description}")
        return 0
    if not args.job:
        raise ConfigError("validate: give a job file (or --keys to list every key)")
    job = load_job(args.job, args.overrides)
    if job.tune.search_space is not None or job.tune.points_to_evaluate:
        from ce_ray.tuning.space import search_space

        search_space(job)
    if job.tune.refit:
        from ce_ray.tuning.space import refit_job

        refit_job(job, job)
    if args.data:
        from ce_ray.data import load_split

        for split in ("train", "eval", "test"):
            if getattr(job.data, split) is not None:
                rows = load_split(job, split)
                print(f"data.{split}: {rows.num_rows} valid rows ({rows.layout}), {rows.dropped} dropped")
    print(f"{args.job}: valid")
    if args.show:
        _print_json(job.to_dict())
    return 0


def _job_for_model(task: str | None, model: str, overrides: Sequence[str]) -> JobConfig:
    from ce_ray.modeling import read_task

    task = task or read_task(model)
    if task is None:
        raise ConfigError("--task: cannot tell the task from the model (give --task nli or --task rerank)")
    return load_job(None, [f"task={task}", *overrides])


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ce_ray.config import DataSource
    from ce_ray.quality import evaluate

    job = _job_for_model(args.task, args.model, args.overrides)
    source = DataSource.model_validate(args.data if not args.columns else {"path": args.data, "columns": json.loads(args.columns)})
    job.data.test = source
    _print_json({"model": args.model, "task": job.task, **evaluate(job, args.model, "test", key="--data")})
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from ce_ray.modeling import load_for_inference, predict_pairs

    if len(args.texts) % 2:
        raise ConfigError("predict: give texts in pairs: A1 B1 [A2 B2 ...]")
    pairs = list(zip(args.texts[::2], args.texts[1::2]))
    model = load_for_inference(args.model)
    _print_json(predict_pairs(model, pairs))
    return 0


def _cmd_rank(args: argparse.Namespace) -> int:
    from ce_ray.modeling import load_for_inference

    if not args.documents:
        raise ConfigError("rank: give at least one document after --query")
    model = load_for_inference(args.model)
    ranked = model.rank(args.query, args.documents, top_k=args.top_n, return_documents=True)
    _print_json([{"index": r["corpus_id"], "score": float(r["score"]), "document": r["text"]} for r in ranked])
    return 0


def _model_overrides(models: list[str]) -> list[str]:
    """``--model DIR`` -> serve.model; ``--model NAME=DIR`` (repeatable) -> serve.models (then serve.model is unset)."""
    named = [m for m in models if "=" in m]
    if not named:
        if len(models) > 1:
            raise ConfigError("--model: give one DIR, or several as NAME=DIR (e.g. --model legal=runs/legal/best)")
        return [f"serve.model={m}" for m in models]
    if len(named) != len(models):
        raise ConfigError("--model: give one DIR, or name every model as NAME=DIR (not both)")
    overrides = ["serve.model=null"]
    for item in named:
        name, _, path = item.partition("=")
        if not name.strip() or not path.strip() or "." in name:
            raise ConfigError(f"--model {item!r}: expected NAME=DIR, NAME without dots (e.g. legal=runs/legal/best)")
        overrides.append(f"serve.models.{name.strip()}={path.strip()}")
    return overrides


def _cmd_serve(args: argparse.Namespace) -> int:
    from ce_ray.serving import serve_forever

    if args.update or args.rollback:
        return _update(args)
    overrides = list(args.overrides)
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key: empty, which would serve without authentication; give a real key or leave it out")
    overrides += _model_overrides(args.model or [])
    for key in ("host", "port", "api_key"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"serve.{key}={value}")
    job = load_job(args.job, overrides, base=None if args.job else {"task": "rerank"})
    serve_forever(job.serve)
    return 0


def _update(args: argparse.Namespace) -> int:
    """``ce-ray serve --model [NAME=]DIR --update`` / ``--rollback``: roll a running app over, print what it serves."""
    from ce_ray.serving import update_server
    from ce_ray.serving.catalog import catalog

    if args.update and args.rollback:
        raise ConfigError("--update and --rollback: give one (--rollback goes back to what served before the update)")
    if args.job or args.overrides or args.host or args.port or args.api_key:
        raise ConfigError("--update/--rollback change the model(s) of the running app only; give just --model")
    models = {}
    for item in args.model or []:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        models[name.strip()] = path.strip()
    if args.rollback and models:
        raise ConfigError("--rollback takes no --model: it serves again what the app served before its last update")
    served = update_server(models, name=args.app, rollback=args.rollback)
    _print_json({"app": args.app, "models": catalog(served).locations})
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ce_ray.serving.backends import export_backend

    written = export_backend(args.model, args.backend, optimize=args.optimize, quantize=args.quantize, output=args.output)
    model_dir = os.path.dirname(os.path.dirname(written))
    print(f"wrote {written}")
    print(f"serve it: ce-ray serve --model {model_dir} --set serve.backend={args.backend} "
          f"--set serve.model_file={os.path.basename(written)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ce_ray.demo import run_demo

    with console.session("demo", args.output_dir, verbose=args.verbose > 0):
        run_demo(args.output_dir, quick=args.quick, serve=not args.no_serve, tune=not args.no_tune)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ce-ray",
        description="Fine-tune, tune and serve sentence-transformers CrossEncoders on Ray.",
        epilog="examples:" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        # also after the subcommand (ce-ray train JOB -v); SUPPRESS keeps a -v given before it
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        return p

    for name, func, help_text in (
        ("train", _cmd_train, "train one job on Ray Train (DDP over scaling.num_workers)"),
        ("tune", _cmd_tune, "search hyperparameters with Ray Tune; writes best/, best.json, trials.csv"),
    ):
        p = add(name, func, help_text)
        _add_job_args(p)
        p.add_argument(
            "--restart", action="store_true", help="start this run.name over (delete its checkpoints) instead of resuming"
        )

    p = add("validate", _cmd_validate, "check a job file (and with --data its rows) without running it")
    _add_job_args(p, required=False)
    p.add_argument("--data", action="store_true", help="also read and check the data rows")
    p.add_argument("--show", action="store_true", help="print the full job with defaults filled in")
    p.add_argument("--keys", action="store_true", help="list every key with its default and meaning")

    p = add("evaluate", _cmd_evaluate, "score a model on a labelled file with the task's evaluator")
    p.add_argument("--model", required=True, help="CrossEncoder directory or hub id")
    p.add_argument("--task", choices=["nli", "rerank"], help="default: read from the model's ce-ray metadata")
    p.add_argument("--data", required=True, help="Parquet/JSONL/CSV file (nli: premise, hypothesis, label; rerank: query, positive, negative)")
    p.add_argument("--columns", help='column mapping as JSON, e.g. \'{"query": "question"}\'')
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = add("predict", _cmd_predict, "classify text pairs (NLI / classification models)")
    p.add_argument("--model", required=True)
    p.add_argument("texts", nargs="+", help="A1 B1 [A2 B2 ...]")

    p = add("rank", _cmd_rank, "rank documents for a query (reranker models)")
    p.add_argument("--model", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--top-n", type=int, default=None)
    p.add_argument("documents", nargs="*")

    p = add("serve", _cmd_serve, "serve a model over HTTP with Ray Serve (POST /rerank, /predict)")
    _add_job_args(p, required=False)
    p.add_argument(
        "--model",
        action="append",
        help="model directory, or a train/tune output_dir (uses best/ or final/); several models: repeat as "
        "NAME=DIR (a request's 'model' field picks one; the first is the default)",
    )
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key", help="require this bearer token (prefer env CE_RAY_API_KEY)")
    p.add_argument(
        "--update",
        action="store_true",
        help="swap the model of the running app (--model DIR, or NAME=DIR per model) in place, with Ray Serve's "
        "rolling update: new replicas load and pass health, then old ones finish what they hold and stop",
    )
    p.add_argument("--rollback", action="store_true", help="serve again what the running app served before its last update")
    p.add_argument("--app", default="ce-ray", help="the Serve app to --update or --rollback (default ce-ray)")

    p = add("export", _cmd_export, "export a model for serve.backend onnx or openvino (into its onnx/ or openvino/ folder)")
    p.add_argument("model", help="CrossEncoder directory, or a train/tune output_dir (uses best/ or final/)")
    p.add_argument("--backend", required=True, choices=["onnx", "openvino"])
    p.add_argument("--optimize", choices=["O1", "O2", "O3", "O4"], help="onnx: ONNX Runtime graph optimisation level (O4: fp16, for GPUs)")
    p.add_argument(
        "--quantize",
        choices=["qint8", "arm64", "avx2", "avx512", "avx512_vnni"],
        help="onnx: dynamic int8 quantization for a CPU target (qint8: this CPU's)",
    )
    p.add_argument("--output", help="write a new model directory here instead of into MODEL")

    p = add("demo", _cmd_demo, "offline end-to-end demo: train NLI + reranker, tune, serve (bundled MiniLM)")
    p.add_argument("--output-dir", default="demo_runs", help="where the demo writes data and runs")
    p.add_argument("--quick", action="store_true", help="smaller demo (fewer steps and trials)")
    p.add_argument("--no-tune", action="store_true", help="skip the hyperparameter search")
    p.add_argument("--no-serve", action="store_true", help="skip serving")
    return parser


def _quiet_progress_bars() -> None:
    """No tqdm bars in this process: Hugging Face's own (``Loading weights``, downloads) and any other library's."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"  # tqdm reads TQDM_* as its defaults
    if "transformers" in sys.modules:  # imported already (main() called in-process): it read the variable then
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = args.command in QUIET and not args.verbose
    if quiet:  # before any Hugging Face import: their progress bars read these once
        _quiet_progress_bars()
    logging.basicConfig(
        # sentence-transformers shows its "Batches" bars when its logger is at INFO or DEBUG
        level=logging.DEBUG if args.verbose > 1 else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except ConfigError as exc:  # includes DataError: a clear message, no traceback
        print("error: " + "\n       ".join(exc.errors), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from ce_ray.demo import DemoError

        if not isinstance(exc, DemoError):
            raise
        print(f"error: demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
