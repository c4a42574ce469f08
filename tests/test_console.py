"""What ce-ray prints: its own lines on the terminal, everything else in the run's log, errors in full.

The end-to-end checks (a real ``ce-ray train`` with Ray workers) are in tests/test_quality.py and, for
``ce-ray tune``, tests/test_tune.py; these check the pieces (the last one with a local Ray).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

from ce_ray.console import Console, TrainProgress, TuneBoard, log_path


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def events(t0: float = 1000.0) -> list[dict]:
    """What rank 0 sends for a 20-step run (global batch 32), evaluating at steps 0 and 10."""
    base = {"max_steps": 20}
    return [
        {**base, "kind": "start", "step": 0, "t": t0, "samples": 0, "train_s": 0.0},
        {**base, "kind": "eval", "step": 0, "t": t0 + 5, "metrics": {"eval_ndcg@10": 0.2178, "eval_mrr@10": 0.16}},
        {**base, "kind": "log", "step": 10, "t": t0 + 25, "samples": 320, "train_s": 16.0, "loss": 1.0441, "learning_rate": 1.2e-5},
        {**base, "kind": "eval", "step": 10, "t": t0 + 30, "metrics": {"eval_ndcg@10": 0.2798}},
        {**base, "kind": "step", "step": 15, "t": t0 + 33, "samples": 480, "train_s": 24.0},
    ]


def test_the_live_line_has_step_loss_lr_metric_samples_per_second_and_eta():
    terminal = Terminal()
    progress = TrainProgress(Console(terminal, terminal, verbose=False), "eval_ndcg@10")
    for event in events():
        progress.show(event)
    # 15 of 20 steps in 33 s of rank 0's clock (evaluations included): 5 more take 11 s
    assert progress.text() == "train: step 15/20 75%  loss 1.0441  lr 1.20e-05  ndcg@10 0.2798  20.0 samples/s  ETA 0:11"
    shown = terminal.getvalue()
    # on a terminal the line is redrawn in place; evaluations are lines of their own above it
    assert shown.endswith("\r\x1b[2K" + progress.text())
    lines = shown.replace("\r\x1b[2K", "\n").split("\n")
    assert "train: eval at step 0/20: ndcg@10 0.2178" in lines
    assert "train: eval at step 10/20: ndcg@10 0.2798 (start 0.2178)" in lines

    progress.show({"max_steps": 20, "kind": "end", "step": 20, "t": 1050.0, "samples": 640, "train_s": 32.0})
    assert progress.text().endswith("20.0 samples/s  done in 0:50")


def test_without_a_terminal_progress_is_plain_lines_at_each_evaluation_and_every_few_seconds():
    plain = io.StringIO()
    progress = TrainProgress(Console(plain, plain, verbose=False), "eval_accuracy", label="[2/5] nli")
    renamed = [{**e, "metrics": {"eval_accuracy": v for v in e["metrics"].values()}} if e["kind"] == "eval" else e for e in events()]
    for event in renamed:
        progress.show(event)
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue()
    assert lines[0] == "[2/5] nli: step 0/20 0%"
    assert lines[1].startswith("[2/5] nli: eval at step 0/20: accuracy")
    assert lines[2].startswith("[2/5] nli: step 10/20 50%  loss 1.0441")  # 25 s after the last progress line
    assert lines[3].startswith("[2/5] nli: eval at step 10/20")
    assert len(lines) == 4  # step 15 came 8 s after the last progress line (PLAIN_EVERY_S: 10 s)

    # the last step's line waits for the end of training, with the numbers of the last log
    progress.show({"max_steps": 20, "kind": "step", "step": 20, "t": 1045.0, "samples": 640, "train_s": 32.0})
    progress.show({"max_steps": 20, "kind": "end", "step": 20, "t": 1050.0, "samples": 640, "train_s": 32.0})
    lines = plain.getvalue().splitlines()
    assert len(lines) == 5 and lines[4].startswith("[2/5] nli: step 20/20 100%") and lines[4].endswith("done in 0:50")


def test_the_search_prints_a_line_per_trial_and_the_best_so_far():
    plain = io.StringIO()
    board = TuneBoard(Console(plain, plain, verbose=False), total=3, metric="eval_ndcg@10", mode="max")
    board.result("a", {"eval_ndcg@10": 0.5, "step": 6, "max_steps": 12}, done=0, running=2)
    board.result("b", {"eval_ndcg@10": 0.7, "step": 6, "max_steps": 12}, done=0, running=2)
    board.finished("a", {"train.learning_rate": 1e-4, "train.loss": "BinaryCrossEntropyLoss"}, {"step": 6, "max_steps": 12}, done=1, running=1)
    board.failed("c", {"train.loss": '{"name": "CrossEntropyLoss", "label_smoothing": 0.1}'}, "Traceback ...\nValueError: x\n", done=2, running=1)
    lines = plain.getvalue().splitlines()
    assert lines[1].startswith("tune: 0/3 trials done, 2 running  best ndcg@10 0.7000 (trial b)  trial b at step 6/12")
    assert lines[2] == "trial a stopped early at step 6/12: learning_rate=0.0001 loss=BinaryCrossEntropyLoss: best ndcg@10 0.5000  (1/3 done)"
    assert lines[4:7] == ["trial c FAILED: loss=CrossEntropyLoss(label_smoothing=0.1)  (2/3 done)", "Traceback ...", "ValueError: x"]
    assert lines[7].startswith("tune: 2/3 trials done, 1 running  best ndcg@10 0.7000 (trial b)")


def test_a_search_shows_each_trials_progress_as_train_does_headed_by_the_trial():
    """rank 0 of each trial tags its events with the trial id (TrialEvents, through the real queue in
    tests/test_tune.py); each trial gets train's line of its own."""
    from ce_ray.console import SearchProgress

    sent = [{**event, "trial": trial_id} for trial_id, t0 in (("a1", 1000.0), ("b2", 1002.0)) for event in events(t0)]
    plain = io.StringIO()
    progress = SearchProgress(Console(plain, plain, verbose=False), "eval_ndcg@10")
    for event in sorted(sent, key=lambda e: e["t"]):  # the two trials' events, interleaved
        progress.show(event)
    lines = plain.getvalue().splitlines()
    for trial_id in ("a1", "b2"):
        mine = [line for line in lines if line.startswith(f"trial {trial_id}: ")]
        assert mine == [
            f"trial {trial_id}: step 0/20 0%",
            f"trial {trial_id}: eval at step 0/20: ndcg@10 0.2178",
            f"trial {trial_id}: step 10/20 50%  loss 1.0441  lr 1.20e-05  ndcg@10 0.2178  20.0 samples/s  ETA 0:25",
            f"trial {trial_id}: eval at step 10/20: ndcg@10 0.2798 (start 0.2178)",
        ]
    assert len(lines) == 8


SESSION = """
import logging, os, sys
from ce_ray import console

logging.basicConfig(level=logging.INFO)
with console.session("train job.yaml", sys.argv[1], verbose=sys.argv[2] == "verbose"):
    console.say("ce-ray: a line of its own")
    print("a library's print")
    os.write(2, b"C-level stderr of a library\\n")
    logging.getLogger("transformers.modeling").info("a library's INFO record")
    logging.getLogger("ce_ray.data.check").warning("data.train: dropped 2 invalid row(s)")
    raise RuntimeError("boom: the whole message")
"""


def _session(tmp_path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(SESSION), str(tmp_path / "out"), mode],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_a_session_keeps_the_terminal_for_ce_ray_and_sends_the_rest_to_the_log(tmp_path):
    proc = _session(tmp_path, "quiet")
    log = tmp_path / "out" / "logs" / "console.log"
    assert log_path(str(tmp_path / "out")) == str(log)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"ce-ray train job.yaml  (Ray, Hugging Face and worker logs: {log}; --verbose prints them here)",
        "ce-ray: a line of its own",
    ]
    # ce-ray's warnings and the error, in full, on stderr; the libraries' output only in the log
    assert "WARNING: data.train: dropped 2 invalid row(s)" in proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr and "RuntimeError: boom: the whole message" in proc.stderr
    for noise in ("a library's print", "C-level stderr", "a library's INFO record"):
        assert noise not in proc.stdout + proc.stderr
    logged = log.read_text()
    assert logged.startswith("\n===== ce-ray train job.yaml")
    for line in ("a library's print", "C-level stderr of a library", "INFO:transformers.modeling:a library's INFO record",
                 "RuntimeError: boom: the whole message"):  # fmt: skip
        assert line in logged

    # a second command on the same output_dir appends to the log
    _session(tmp_path, "quiet")
    assert log.read_text().count("===== ce-ray train job.yaml") == 2


def test_verbose_keeps_everything_on_the_terminal(tmp_path):
    proc = _session(tmp_path, "verbose")
    assert proc.stdout.splitlines() == ["ce-ray: a line of its own", "a library's print"]
    assert "C-level stderr of a library" in proc.stderr and "a library's INFO record" in proc.stderr
    assert "RuntimeError: boom: the whole message" in proc.stderr
    assert not (tmp_path / "out" / "logs").exists()


def test_the_progress_queue_lives_on_the_drivers_node_and_losing_it_never_fails_the_run(ray_session):
    """Found by CI: the queue actor landed on the worker node that the two-node test kills, and the run that
    survived the node's loss then failed on the console's queue. The queue is pinned to the driver's node, and
    a dead queue stops the live line only: rank 0's callback and the driver's exit carry on."""
    from types import SimpleNamespace

    from ray.util.state import get_actor

    from ce_ray.training.callbacks import Progress

    plain = io.StringIO()
    with TrainProgress(Console(plain, plain, verbose=False), "eval_ndcg@10") as progress:
        assert progress.queue.qsize() >= 0  # a call answered: the actor is placed and alive
        gcs = ray_session.get_runtime_context().gcs_address  # this session's Ray, whatever else runs on the machine

        def queue_actor(state: str):
            """The queue actor as the state API reports it, once in ``state`` (it can lag the actor by a moment)."""
            deadline = time.monotonic() + 30
            while (actor := get_actor(progress.queue.actor._actor_id.hex(), address=gcs)).state != state and time.monotonic() < deadline:
                time.sleep(0.1)
            return actor

        actor = queue_actor("ALIVE")
        assert actor.node_id == ray_session.get_runtime_context().get_node_id(), actor

        callback = Progress(progress.queue, world_size=1)
        args = SimpleNamespace(per_device_train_batch_size=8)
        state = SimpleNamespace(global_step=0, max_steps=4)
        callback.on_train_begin(args, state, None)
        # the driver's reader prints the start line once it has taken it off the queue: kill the queue only then,
        # else the line dies in the actor with it (CI saw that once)
        deadline = time.monotonic() + 30
        while "train: step 0/4 0%" not in plain.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        ray_session.kill(progress.queue.actor)
        # ray.kill returns before the actor is gone, and a call sent meanwhile may still be answered (CI under load saw it)
        queue_actor("DEAD")
        state.global_step = 4
        callback.on_train_end(args, state, None)  # the queue is gone: a warning, no exception
        assert callback.queue is None
    assert "train: step 0/4 0%" in plain.getvalue()
    assert "train: live progress stopped (" in plain.getvalue()


NOISE = re.compile(r" INFO |\d+%\|")  # a logging record at INFO, a tqdm bar ("Batches:  100%|████| 1/1")


def _small_command(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ce_ray.cli", *argv], capture_output=True, text=True, timeout=180,
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip


def test_rank_predict_and_evaluate_print_only_their_json_unless_verbose(tiny_model, tmp_path):
    """The one-result commands: the result on stdout, no INFO records or progress bars (issue 23, item 5)."""
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"answer {i}", "negative": [f"other {i}", "no"]}) + "\n" for i in range(4)))
    commands = {
        "rank": ["rank", "--model", tiny_model, "--query", "who?", "doc one", "doc two"],
        "predict": ["predict", "--model", tiny_model, "A man eats", "A man is eating"],
        "evaluate": ["evaluate", "--model", tiny_model, "--task", "rerank", "--data", str(data)],
    }
    # the four processes (each mostly its single-threaded imports) two at a time, one per core
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip([*commands, "rank -v"], pool.map(lambda argv: _small_command(tmp_path, *argv),
                                                         [*commands.values(), [*commands["rank"], "-v"]])))
    results = {}
    for name in commands:
        proc = procs[name]
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads(proc.stdout)  # nothing but the JSON
        assert not NOISE.search(proc.stdout + proc.stderr), proc.stdout + proc.stderr
        assert proc.stderr == "", proc.stderr
    assert [r["document"] for r in results["rank"]] and len(results["predict"]) == 1
    assert results["evaluate"]["rows"] == 4 and 0 <= results["evaluate"]["ndcg@10"] <= 1

    # -v: the libraries' logging and progress bars are back on stderr, the result alone on stdout
    proc = procs["rank -v"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert " INFO sentence_transformers" in proc.stderr and "Batches: 100%|" in proc.stderr, proc.stderr
    assert json.loads(proc.stdout) == results["rank"]
