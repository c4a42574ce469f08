"""Preparing a large NLI training set: time and peak host memory of checking rows and of prepare_split.

For each size N it generates N synthetic NLI rows (premise about 40-120 characters, hypothesis 20-80,
of English words, every row different; label 0..2), optionally with a share of bad rows
(``--bad-share``: empty or blank premise, missing hypothesis, label out of range; the job then sets
``data.drop_invalid: true``), writes them to a Parquet file in a temp dir, then measures, each in a
fresh process:

  (a) ``check``: ``check_rows`` alone on the table ``read_source`` read (the read is not timed);
  (b) ``prepare``: the full ``ce_ray.data.prepare_split(job, "train")`` of an nli job, which reads, checks,
      shapes and saves the Arrow files (cache under a fresh ``run.output_dir``, so nothing is reused).

Printed per run: seconds, the peak RSS of the process during the step (VmHWM, reset when the step
starts: for ``check`` it includes the read table) and its growth over the RSS when the step started
(what the step itself adds; Arrow allocates outside Python, so tracemalloc would not see it).
``--check-module`` swaps in ``check_rows`` from another file for before/after numbers, e.g. the
previous implementation:

    python bench/prepare_scale.py                                   # 100k and 1M rows
    python bench/prepare_scale.py --rows 100000 --bad-share 0.01 --json out.json
    git show HEAD~1:ce_ray/data/check.py > /tmp/old_check.py
    python bench/prepare_scale.py --check-module /tmp/old_check.py --label before

Goal: 1M rows through the full prepare_split in under 60 s on a 2-core machine.

``--task rerank`` measures mining instead (issue 24): N synthetic (question, answer) pairs (questions 30-80
characters, answers 80-200), a LambdaLoss job that mines 3 hard negatives per question (``sampling: top``), and
per size the full ``prepare_split`` on each path, each in a fresh process with its own local Ray:

  ``driver``: sentence-transformers' ``mine_hard_negatives`` in the process;
  ``cluster-1`` / ``cluster-2``: ``data.prepare_on: cluster`` with ``data.negatives.concurrency`` 1 / 2.

Printed: seconds, embedding throughput (texts/s, from the task's progress line: all texts over the embedding
stage's wall time, actor start-up included), search throughput (queries/s, likewise over the search stage), the driver process's peak RSS, and the largest peak RSS of each kind
of Ray worker (the preparation task, an encoder actor, a search actor), sampled every 0.2 s.

    python bench/prepare_scale.py --task rerank --rows 10000 100000 1000000 --model /path/to/tiny-encoder
    python bench/prepare_scale.py --task rerank --rows 10000 --model bundled:all-MiniLM-L6-v2 --runs cluster-1 cluster-2
    python bench/prepare_scale.py --task rerank --rows 10000 --precision fp32     # the encoder in fp32 (default: auto)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "a an the man woman child children boy girl dog cat people person group two three young old tall "
    "is are was sits stands walks runs plays eats reads holds wears looks watches rides jumps sleeps "
    "on in at near under behind beside with without into across along through over "
    "street park beach field table bench river road building kitchen stage water snow grass city "
    "red blue green black white small large wooden crowded busy quiet sunny outside inside together "
    "ball book guitar bicycle camera shirt hat jacket umbrella phone bag car boat horse"
).split()
BAD_KINDS = ("premise empty", "premise blank", "hypothesis missing", "label out of range", "label negative")


def _sentences(rng, n: int, lo: int = 40, hi: int = 120):
    """n different sentences of lo..hi characters (whole words), built column-wise with pyarrow."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    vocab = np.array(WORDS)
    word_len = np.char.str_len(vocab) + 1  # with the space after it
    per_row = hi // 2  # more words than a sentence can hold
    idx = rng.integers(0, len(vocab), size=(n, per_row))
    ends = np.cumsum(word_len[idx], axis=1) - 1  # length of the sentence ending with word j
    target = rng.integers(lo, hi + 1, size=n)
    count = np.maximum((ends <= target[:, None]).sum(axis=1), 1)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(count, out=offsets[1:])
    flat = idx[np.arange(per_row) < count[:, None]]  # row-major: each row's first count words
    words = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(vocab).take(pa.array(flat)))
    text = pc.binary_join(words, " ")
    return pc.utf8_capitalize(pc.binary_join_element_wise(text, pa.scalar("."), ""))


def make_rows(n: int, bad_share: float, seed: int = 0):
    """The synthetic NLI table (premise, hypothesis, label) and how many rows were made bad."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    premise, hypothesis = _sentences(rng, n), _sentences(rng, n, 20, 80)
    label = pa.array(rng.integers(0, 3, size=n))
    bad = np.flatnonzero(rng.random(n) < bad_share) if bad_share > 0 else np.zeros(0, np.int64)
    if bad.size:
        kinds = {k: bad[i :: len(BAD_KINDS)] for i, k in enumerate(BAD_KINDS)}

        def put(col, rows, value):
            mask = np.zeros(n, bool)
            mask[rows] = True
            return pc.if_else(pa.array(mask), pa.scalar(value, col.type), col)

        premise = put(put(premise, kinds["premise empty"], ""), kinds["premise blank"], " \t\u00a0")
        hypothesis = put(hypothesis, kinds["hypothesis missing"], None)
        label = put(put(label, kinds["label out of range"], 7), kinds["label negative"], -1)
    return pa.table({"premise": premise, "hypothesis": hypothesis, "label": label}), int(bad.size)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    """RSS high-water mark of this process: VmHWM (Linux), else ru_maxrss.

    ru_maxrss alone would not do: Linux carries it over exec from the forked parent, here the process that
    generated the rows.
    """
    hwm = _status_mib("VmHWM")
    return hwm if hwm == hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(mode: str, path: str, out_dir: str, check_module: str | None, drop_invalid: bool) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    from ce_ray.config import load_job
    from ce_ray.data import prepare
    from ce_ray.data.read import read_source

    check_rows = prepare.check_rows
    if check_module:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_check_module", check_module)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        check_rows = prepare.check_rows = module.check_rows  # prepare_split calls it by this name
    overrides = ["task=nli", f"data.train={path}", f"run.output_dir={out_dir}"]
    job = load_job(None, overrides + (["data.drop_invalid=true"] if drop_invalid else []))
    import logging

    import datasets  # noqa: F401  (imported by the steps; imported here so the growth is the data's)
    import pyarrow.parquet  # noqa: F401

    logging.getLogger("ce_ray.data.check").setLevel(logging.ERROR)  # the dropped-rows warning
    if mode == "check":
        table = read_source(job.data.train, "data.train")
    base = _status_mib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    if mode == "check":
        rows = check_rows(table, job, "train", "data.train")
        kept, dropped = rows.num_rows, rows.dropped
    else:
        split = prepare.prepare_split(job, "train")
        kept, dropped = split.rows, split.dropped
    seconds = time.perf_counter() - start
    peak = _peak_mib()
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "growth_mib": peak - base, "kept": kept, "dropped": dropped}))


def make_pairs(n: int, seed: int = 0):
    """The synthetic rerank pairs (question, answer), every row different."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    return pa.table({"question": _sentences(rng, n, 30, 80), "answer": _sentences(rng, n, 80, 200)})


class _WorkerPeaks:
    """Peak RSS (MiB) per kind of Ray worker process, sampled from a thread every 0.2 s."""

    KINDS = {"prepare_train": "task", "_Encoder": "encoder", "_Searcher": "search"}

    def __init__(self):
        import threading

        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                line = " ".join(proc.info["cmdline"] or ())
                if not line.startswith("ray::") or proc.info["memory_info"] is None:
                    continue
                for marker, kind in self.KINDS.items():
                    if marker in line:
                        rss = proc.info["memory_info"].rss / 2**20
                        self.peaks[kind] = max(self.peaks.get(kind, 0.0), rss)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def _rerank_child(mode: str, path: str, out_dir: str, model: str, precision: str) -> None:
    """One rerank preparation in this (fresh) process; prints one JSON line."""
    import logging

    from ce_ray.config import load_job
    from ce_ray.data import prepare

    where, _, actors = mode.partition("-")
    overrides = [
        "task=rerank", "train.loss=LambdaLoss", f"data.train={{path: {path}, columns: {{query: question, positive: answer}}}}",
        f"run.output_dir={out_dir}", f"data.prepare_on={where}", f"data.negatives.model={model}", "data.negatives.num=3",
        "data.negatives.sampling=top", "data.negatives.max_score=null", "data.negatives.relative_margin=null",
        f"data.negatives.precision={precision}",
    ]  # fmt: skip
    if actors:
        overrides.append(f"data.negatives.concurrency={actors}")
    job = load_job(None, overrides)
    logging.getLogger("ce_ray.data").setLevel(logging.ERROR)
    if where == "cluster":
        from ce_ray.runtime import ensure_ray

        ensure_ray()  # not timed: a cluster is up before a job starts
    base = _status_mib("VmRSS")
    _reset_peak()
    peaks = _WorkerPeaks()
    start = time.perf_counter()
    split = prepare.prepare_split(job, "train")
    seconds = time.perf_counter() - start
    workers = peaks.stop()
    peak = _peak_mib()
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "growth_mib": peak - base, "kept": split.rows, "workers": workers}))


def _last_rate(pattern: str, output: str) -> float | None:
    """The rate in the last progress line of ``output`` that matches ``pattern`` (its group: ``12,345``)."""
    import re

    found = re.findall(pattern, output)
    return float(found[-1].replace(",", "")) if found else None


def rerank_main(args) -> None:
    import pyarrow.parquet as pq

    runs = [r for r in args.runs if r not in ("check", "prepare")] or ["driver", "cluster-1", "cluster-2"]
    results = []
    with tempfile.TemporaryDirectory(prefix="ce_ray_scale_") as tmp:
        for n in args.rows:
            path = Path(tmp) / f"pairs-{n}.parquet"
            pq.write_table(make_pairs(n), path)
            for mode in runs:
                if mode == "driver" and n > args.driver_max_rows:
                    results.append({"rows": n, "run": mode, "skipped": f"over --driver-max-rows {args.driver_max_rows:,}"})
                    continue
                out_dir = Path(tmp) / f"run-{n}-{mode}"
                cmd = [sys.executable, __file__, "--task", "rerank", "--model", args.model, "--precision", args.precision,
                       "--child", mode, str(path), str(out_dir)]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if proc.returncode != 0:
                    sys.exit(f"{mode} on {n:,} pairs failed:\n{proc.stderr[-4000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1]) | {"rows": n, "run": mode}
                output = proc.stdout + proc.stderr
                row["texts_per_s"] = _last_rate(r"prepare: embedded [\d,]+/[\d,]+ texts on \d+ actor\(s\), ([\d,]+) texts/s", output)
                row["queries_per_s"] = _last_rate(r"prepare: searched [\d,]+/[\d,]+ queries, ([\d,]+) queries/s", output)
                row["progress"] = [line for line in output.splitlines() if "prepare: " in line]
                results.append(row)
                print(f"  {mode} {n:,} pairs: {row['seconds']:.1f} s, driver peak {row['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)

    print(f"\nsynthetic rerank pairs, 3 hard negatives each (sampling top), encoder {args.model} "
          f"(data.negatives.precision: {args.precision}); {os.cpu_count()} CPUs")  # fmt: skip
    print("| pairs | path | seconds | embed texts/s | search queries/s | driver peak MiB | task peak MiB | encoder actor peak MiB | search actor peak MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "skipped" in r:
            print(f"| {r['rows']:,} | {r['run']} | skipped ({r['skipped']}) | | | | | | |")
            continue
        w = r["workers"]
        cell = lambda k: f"{w[k]:,.0f}" if k in w else "-"  # noqa: E731
        rate = f"{r['texts_per_s']:,.0f}" if r["texts_per_s"] else "-"
        qps = f"{r['queries_per_s']:,.0f}" if r.get("queries_per_s") else "-"
        print(f"| {r['rows']:,} | {r['run']} | {r['seconds']:,.1f} | {rate} | {qps} | {r['peak_mib']:,.0f} | {cell('task')} | {cell('encoder')} | {cell('search')} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--bad-share", type=float, default=0.0, help="share of rows made invalid (then data.drop_invalid: true)")
    parser.add_argument("--task", choices=["nli", "rerank"], default="nli")
    parser.add_argument("--runs", nargs="+", choices=["check", "prepare", "driver", "cluster-1", "cluster-2"], default=["check", "prepare"])
    parser.add_argument("--model", default="bundled:all-MiniLM-L6-v2", help="rerank: data.negatives.model")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="rerank: data.negatives.precision")
    parser.add_argument("--driver-max-rows", type=int, default=100_000,
                        help="rerank: skip the driver path above this (mine_hard_negatives scores 16,384 queries x the "
                        "whole corpus at once: 64 GB at 1M pairs)")  # fmt: skip
    parser.add_argument("--check-module", help="a .py file whose check_rows replaces ce-ray's (before/after numbers)")
    parser.add_argument("--label", default=None, help="name of this implementation in the table (default: ce-ray, or the module's file name)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PARQUET", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.task == "rerank":
        _rerank_child(*args.child, args.model, args.precision)
        return
    if args.child:
        _child(*args.child, args.check_module, args.bad_share > 0)
        return
    if args.task == "rerank":
        rerank_main(args)
        return

    import pyarrow.parquet as pq

    label = args.label or (Path(args.check_module).name if args.check_module else "ce-ray")
    results = []
    with tempfile.TemporaryDirectory(prefix="ce_ray_scale_") as tmp:
        for n in args.rows:
            path = Path(tmp) / f"train-{n}.parquet"
            table, bad = make_rows(n, args.bad_share)
            pq.write_table(table, path)
            size_mib = path.stat().st_size / 2**20
            del table
            for mode in args.runs:
                out_dir = Path(tmp) / f"run-{n}-{mode}"
                cmd = [sys.executable, __file__, "--child", mode, str(path), str(out_dir), "--bad-share", str(args.bad_share)]
                if args.check_module:
                    cmd += ["--check-module", args.check_module]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if proc.returncode != 0:
                    sys.exit(f"{mode} on {n:,} rows failed:\n{proc.stderr[-4000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row |= {"rows": n, "bad": bad, "parquet_mib": size_mib, "run": mode, "impl": label}
                results.append(row)
                print(f"  {label}: {mode} {n:,} rows: {row['seconds']:.2f} s, peak {row['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)

    print(f"\nsynthetic NLI rows (premise 40-120 chars, hypothesis 20-80), bad share {args.bad_share:g}; {os.cpu_count()} CPUs")
    print(f"{'impl':14} {'run':8} {'rows':>10} {'parquet MiB':>11} {'seconds':>8} {'rows/s':>10} {'peak MiB':>9} {'growth MiB':>10} {'kept':>10} {'dropped':>8}")
    for r in results:
        print(
            f"{r['impl']:14} {r['run']:8} {r['rows']:>10,} {r['parquet_mib']:>11.1f} {r['seconds']:>8.2f} {r['rows'] / r['seconds']:>10,.0f} "
            f"{r['peak_mib']:>9.0f} {r['growth_mib']:>10.0f} {r['kept']:>10,} {r['dropped']:>8,}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
