"""What ``ce-ray train|tune|demo`` print: ce-ray's own lines on the terminal, everything else in a log file.

A console :func:`session` (the CLI opens one per command) points the process's stdout and stderr (file
descriptors 1 and 2) at ``<run.output_dir>/logs/console.log``: Ray's driver messages, the worker logs
Ray forwards from every node (``log_to_driver``), Hugging Face and sentence-transformers logging,
tqdm bars and C-level output all land there. ce-ray writes to the terminal through the copies of the
original descriptors it kept:

- :func:`say` a line of its own (what it is doing, scores, the final summary), :func:`warn` on stderr;
- :class:`TrainProgress` one live line per training run (step/total, loss, learning rate, the eval
  metric, samples/s, ETA), fed by rank 0 of the Ray Train workers through a ``ray.util.queue.Queue``
  (an actor, so it works across nodes); a carriage return redraws it on a terminal, and without one
  (CI, ``ray job submit`` logs) it prints a plain line at each evaluation and at most every
  :data:`PLAIN_EVERY_S` seconds in between;
- :class:`SearchProgress` the same line for every trial of a search (``trial <id>: step ...``): one queue
  for the search, rank 0 of each trial sends its events through a :class:`TrialEvents` that tags them;
- :class:`TuneBoard` one line per finished trial and a live line with trials done/total and the best so far;
- :func:`train_summary`, :func:`tune_summary` the final report of a run.

Errors still print in full: ``ConfigError`` messages and tracebacks reach the terminal's stderr (the
session puts the descriptors back before an exception leaves it), so do warnings of ce-ray's own
loggers and ERROR records of any logger, and a failed trial's traceback. ``--verbose`` keeps the
descriptors as they are: today's full output, with ce-ray's lines as plain lines among it. Outside a
session (the Python API) :func:`say` is a plain ``print`` and there is no live line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, TextIO

__all__ = [
    "Console",
    "SearchProgress",
    "TrainProgress",
    "TrialEvents",
    "TuneBoard",
    "active",
    "driver_queue",
    "log_path",
    "say",
    "search_progress",
    "session",
    "train_progress",
    "train_summary",
    "tune_summary",
    "warn",
]

PLAIN_EVERY_S = 10.0  # without a terminal: a progress line at most this often between evaluations
_CLEAR = "\r\x1b[2K"

_active: Console | None = None


class Console:
    """ce-ray's own output: plain lines, and at most one live line kept at the bottom on a terminal."""

    def __init__(self, out: TextIO, err: TextIO, verbose: bool):
        self.out, self.err = out, err
        self.verbose = verbose
        self.tty = out.isatty() and not verbose  # among --verbose output a redrawn line would be torn apart
        self._live = ""
        self._lock = threading.Lock()

    def line(self, text: str, err: bool = False) -> None:
        with self._lock:
            if self._live:
                self.out.write(_CLEAR)
                self.out.flush()
            stream = self.err if err else self.out
            stream.write(text + "\n")
            stream.flush()
            if self._live:
                self.out.write(self._live)
                self.out.flush()

    def live(self, text: str) -> None:
        """Redraw the live line (a terminal) or print it as a plain line (anything else)."""
        if not self.tty:
            self.line(text)
            return
        with self._lock:
            self._live = text
            self.out.write(_CLEAR + text)
            self.out.flush()

    def end_live(self) -> None:
        """Keep the live line as the last plain line and start a new one."""
        with self._lock:
            if self._live:
                self.out.write("\n")
                self.out.flush()
                self._live = ""


def active() -> Console | None:
    """The console of the running session, or None (the Python API)."""
    return _active


def say(text: str) -> None:
    """A line of ce-ray's own on the terminal."""
    if _active is None:
        print(text, flush=True)
    else:
        _active.line(text)


def warn(text: str) -> None:
    """A line of ce-ray's own on the terminal's stderr."""
    if _active is None:
        print(text, file=sys.stderr, flush=True)
    else:
        _active.line(text, err=True)


def log_path(output_dir: str) -> str:
    """Where a session for ``output_dir`` writes the log: ``<output_dir>/logs/console.log`` (a local file;
    for an ``s3://``/``gs://`` output_dir a local file, uploaded there when the session ends)."""
    from ce_ray import storage  # pyarrow: not for every command

    if storage.is_local(output_dir):
        return os.path.join(storage.resolve_uri(output_dir), "logs", "console.log")
    name = storage.join(output_dir, "logs").replace("://", "_").replace("/", "_")
    return os.path.join(tempfile.gettempdir(), "ce-ray-logs", name, "console.log")


class _ConsoleHandler(logging.Handler):
    """ce-ray's own warnings and every logger's errors, on the terminal's stderr as well as in the log."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING and record.name.startswith("ce_ray")):
            if _active is not None:
                text = self.format(record)
                if not record.name.startswith("ce_ray"):
                    text = f"{record.name}: {text}"
                _active.line(f"{record.levelname}: {text}", err=True)


@contextmanager
def session(command: str, output_dir: str, verbose: bool = False) -> Iterator[Console]:
    """Run ``command`` (e.g. ``train jobs/x.yaml``) with ce-ray's lines on the terminal and the rest in the log.

    Unless ``verbose``, file descriptors 1 and 2 point at :func:`log_path` (appended to, one header per
    command) until the session ends; Ray is shut down inside it, so its shutdown messages are logged
    too. An exception leaving the session is written to the log and re-raised with the terminal back
    in place, so it prints in full there.
    """
    from ce_ray import storage

    global _active
    if _active is not None:  # nested (the demo's steps): one session, one log
        yield _active
        return
    if verbose:
        _active = Console(sys.stdout, sys.stderr, verbose=True)
        try:
            yield _active
        finally:
            _shutdown_ray()
            _active = None
        return

    path = log_path(output_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Ray's worker-log prefixes without colour codes, in a file
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    err = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    log.write(f"\n===== ce-ray {command}  {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    log.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    _active = Console(out, err, verbose=False)
    handler = _ConsoleHandler()
    logging.getLogger().addHandler(handler)
    _active.line(f"ce-ray {command}  (Ray, Hugging Face and worker logs: {path}; --verbose prints them here)")
    try:
        yield _active
    except BaseException:
        traceback.print_exc(file=log)
        raise
    finally:
        try:
            _shutdown_ray()
        finally:
            _active.end_live()
            logging.getLogger().removeHandler(handler)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            log.close()
            out.close()
            err.close()
            _active = None
            if not storage.is_local(output_dir):
                target = storage.join(output_dir, "logs", "console.log")
                try:
                    with open(path, "rb") as f:
                        storage.write_bytes(target, f.read())
                except Exception as exc:  # the run's own outcome (or error) matters more than its log's copy
                    print(f"warning: could not copy the log to {target} ({exc}); it stays at {path}", file=sys.stderr)


def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


# --------------------------------------------------------------------------------------------
# training: rank 0 -> a Ray queue -> one live line on the driver
# --------------------------------------------------------------------------------------------
def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def driver_queue():
    """A ``ray.util.queue.Queue`` for progress events, on the driver's node: a run that survives losing a worker
    node must not lose its console with it (left to the scheduler, the actor may land on any node)."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


class TrainProgress:
    """The driver's end of one training run's progress (a context manager around ``trainer.fit()``).

    Rank 0's :class:`ce_ray.training.callbacks.Progress` puts event dicts on :attr:`queue`:
    ``{"kind": "start" | "step" | "log" | "eval" | "end", "step", "max_steps", "t" (rank 0's clock),
    "samples" and "train_s" (rows and step seconds of this attempt), "loss", "learning_rate", "metrics"}``.
    A thread renders them with :meth:`show` until the run ends.
    """

    def __init__(self, console: Console, metric: str, label: str = "train"):
        self.console = console
        self.metric = metric  # e.g. eval_ndcg@10
        self.label = label
        self.queue = None
        self._thread: threading.Thread | None = None
        self._attempt_start: tuple[int, float] | None = None  # (step, t) when this attempt began
        self._last: dict[str, Any] = {}
        self._value: float | None = None
        self._first: float | None = None
        self._plain_at = float("-inf")

    def __enter__(self) -> TrainProgress:
        self.queue = driver_queue()
        self._thread = threading.Thread(target=self._render, name="ce-ray-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        # Progress is best effort: whatever happened to the queue actor (gone: the render thread has stopped),
        # the run's own outcome stands.
        with suppress(Exception):
            self.queue.put(None, timeout=30)  # after everything rank 0 sent: the queue is FIFO
        self._thread.join(timeout=60)
        with suppress(Exception):
            self.queue.shutdown()
        self.console.end_live()

    def _render(self) -> None:
        try:
            while (event := self.queue.get()) is not None:
                self.show(event)
        except Exception as e:  # noqa: BLE001 - the queue actor died: no more live progress
            self.console.line(f"{self.label}: live progress stopped ({type(e).__name__}); the run goes on")

    def show(self, event: dict[str, Any]) -> None:
        """Update the state with one event and print what it changes."""
        kind = event["kind"]
        if kind == "start" or self._attempt_start is None:
            self._attempt_start = (event["step"], event["t"])
        if kind == "eval":
            value = (event.get("metrics") or {}).get(self.metric)
            if value is not None:
                self._eval_line(event, value)
            return
        if kind == "log":
            self._last.update(loss=event.get("loss"), learning_rate=event.get("learning_rate"))
        self._last.update(step=event["step"], max_steps=event["max_steps"], t=event["t"],
                          samples=event.get("samples", 0), train_s=event.get("train_s", 0.0))  # fmt: skip
        last_step = event["step"] >= event["max_steps"] > 0  # plain lines: the "end" event has its final numbers
        if self.console.tty or kind in ("start", "end") or (not last_step and event["t"] - self._plain_at >= PLAIN_EVERY_S):
            self._plain_at = event["t"]
            self.console.live(self.text())

    def _eval_line(self, event: dict[str, Any], value: float) -> None:
        name = self.metric.removeprefix("eval_")
        if self._first is None:
            self._first = value
            text = f"{self.label}: eval at step {event['step']}/{event['max_steps']}: {name} {value:.4f}"
        else:
            text = f"{self.label}: eval at step {event['step']}/{event['max_steps']}: {name} {value:.4f} (start {self._first:.4f})"
        self._value = value
        self.console.line(text)

    def text(self) -> str:
        """The live line: step/total, loss, learning rate, the last eval metric, samples/s, ETA."""
        s = self._last
        step, total = s.get("step", 0), s.get("max_steps") or 0
        parts = [f"{self.label}: step {step}/{total}" + (f" {100 * step // total}%" if total else "")]
        if s.get("loss") is not None:
            parts.append(f"loss {s['loss']:.4f}")
        if s.get("learning_rate") is not None:
            parts.append(f"lr {s['learning_rate']:.2e}")
        if self._value is not None:
            parts.append(f"{self.metric.removeprefix('eval_')} {self._value:.4f}")
        if s.get("train_s"):
            parts.append(f"{s['samples'] / s['train_s']:.1f} samples/s")
        start_step, start_t = self._attempt_start or (step, s.get("t", 0.0))
        done, elapsed = step - start_step, s.get("t", 0.0) - start_t
        if total and step >= total:
            parts.append(f"done in {_clock(elapsed)}")
        elif done > 0 and elapsed > 0:
            parts.append(f"ETA {_clock((total - step) * elapsed / done)}")
        return "  ".join(parts)


def train_progress(metric: str, label: str = "train") -> TrainProgress | None:
    """A :class:`TrainProgress` for the running session, or None outside one (then nothing is sent)."""
    return TrainProgress(_active, metric, label) if _active is not None else None


class TrialEvents:
    """What a trial's rank 0 puts its :class:`ce_ray.training.callbacks.Progress` events on: the search's
    queue, each event tagged with the trial's id (``"trial"``). Plain values only: it travels to the workers."""

    def __init__(self, queue, trial_id: str):
        self.queue, self.trial_id = queue, trial_id

    def put_nowait(self, event: dict[str, Any]) -> None:
        self.queue.put_nowait({**event, "trial": self.trial_id})


class SearchProgress(TrainProgress):
    """The driver's end of every trial's training progress in a search (a context manager around ``tuner.fit()``).

    One queue for the search (:class:`TrainProgress`'s, on the driver's node); each event carries its trial
    id (:class:`TrialEvents`) and goes to a :class:`TrainProgress` of that trial, headed ``trial <id>``
    (the id :class:`TuneBoard`'s lines name): its steps between evaluations, its evaluations and its end,
    in the lines ``ce-ray train`` prints.
    """

    def __init__(self, console: Console, metric: str):
        super().__init__(console, metric, label="tune")
        self.trials: dict[str, TrainProgress] = {}

    def show(self, event: dict[str, Any]) -> None:
        trial_id = event["trial"]
        if trial_id not in self.trials:
            self.trials[trial_id] = TrainProgress(self.console, self.metric, label=f"trial {trial_id}")
        self.trials[trial_id].show(event)


def search_progress(metric: str) -> SearchProgress | None:
    """A :class:`SearchProgress` for the running session, or None outside one (then nothing is sent)."""
    return SearchProgress(_active, metric) if _active is not None else None


# --------------------------------------------------------------------------------------------
# tuning: one line per finished trial, a live line with the search's progress
# --------------------------------------------------------------------------------------------
def _params_text(params: dict[str, Any]) -> str:
    def short(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.2g}"
        if isinstance(value, str) and value.startswith("{"):  # an encoded loss mapping
            value = json.loads(value)
        if isinstance(value, dict):
            name = value.get("name", "")
            options = ", ".join(f"{k}={v}" for k, v in value.items() if k != "name")
            return f"{name}({options})" if options else name
        return str(value)

    return " ".join(f"{key.rsplit('.', 1)[-1]}={short(value)}" for key, value in params.items())


class TuneBoard:
    """What a search prints: a line per finished or failed trial, and a live line (trials done/total, best so far).

    :class:`ce_ray.tuning.progress.ConsoleProgress` calls it from Tune's controller, in the driver, with
    the counts of trials done and running.
    """

    def __init__(self, console: Console, total: int, metric: str, mode: str):
        self.console, self.total, self.metric, self.sign = console, total, metric, 1 if mode == "max" else -1
        self.best: dict[str, float] = {}  # trial id -> its best value so far
        self.best_overall: tuple[float, str] | None = None
        self.started = time.time()

    def seen(self, trial_id: str, value: float) -> None:
        """Record a trial's metric value."""
        if trial_id not in self.best or self.sign * value > self.sign * self.best[trial_id]:
            self.best[trial_id] = value
        if self.best_overall is None or self.sign * value > self.sign * self.best_overall[0]:
            self.best_overall = (value, trial_id)

    def result(self, trial_id: str, result: dict[str, Any], done: int, running: int) -> None:
        if (value := result.get(self.metric)) is not None:
            self.seen(trial_id, value)
        self.console.live(self.text(done, running, f"trial {trial_id} at step {result.get('step')}/{result.get('max_steps')}"))

    def finished(self, trial_id: str, params: dict[str, Any], last: dict[str, Any], done: int, running: int) -> None:
        value = self.best.get(trial_id)
        step, max_steps = last.get("step"), last.get("max_steps")
        how = "stopped early" if step is not None and max_steps and step < max_steps else "finished"
        score = f"best {self.metric.removeprefix('eval_')} {value:.4f}" if value is not None else "no evaluation"
        self.console.line(f"trial {trial_id} {how} at step {step}/{max_steps}: {_params_text(params)}: {score}  ({done}/{self.total} done)")
        self.console.live(self.text(done, running))

    def failed(self, trial_id: str, params: dict[str, Any], error: str, done: int, running: int) -> None:
        self.console.line(f"trial {trial_id} FAILED: {_params_text(params)}  ({done}/{self.total} done)\n{error.rstrip()}", err=True)
        self.console.live(self.text(done, running))

    def text(self, done: int, running: int, latest: str = "") -> str:
        parts = [f"tune: {done}/{self.total} trials done, {running} running"]
        if self.best_overall is not None:
            parts.append(f"best {self.metric.removeprefix('eval_')} {self.best_overall[0]:.4f} (trial {self.best_overall[1]})")
        if latest:
            parts.append(latest)
        parts.append(f"elapsed {_clock(time.time() - self.started)}")
        return "  ".join(parts)


# --------------------------------------------------------------------------------------------
# the final summaries
# --------------------------------------------------------------------------------------------
def _baseline_lines(baseline: dict | None, verdict: dict | None, metric: str) -> list[str]:
    if not baseline:
        return []
    scores = "  ".join(f"{split} {metric} {m[metric]:.4f}" for split in ("eval", "test") if (m := baseline.get(split)))
    lines = [f"retriever baseline ({baseline['model']}, zero-shot cosine): {scores}"]
    if verdict:
        lines.append(verdict["message"])
    return lines


def fusion_line(fusion: dict | None, metric: str) -> str | None:
    """``fused with the retriever (weight 0.35 fitted on eval): eval ndcg@10 0.8812  test ndcg@10 0.8790``, or None."""
    if not fusion:
        return None
    scores = "  ".join(f"{split} {metric} {m[metric]:.4f}" for split in ("eval", "test") if (m := fusion.get(split)))
    return f"fused with the retriever (weight {fusion['weight']:g} fitted on eval, {fusion['normalisation']}): {scores}"


def train_summary(s: dict[str, Any]) -> str:
    """The report ``ce-ray train`` ends with, from ``summary.json``."""
    metric = s["primary_metric"]
    before, after = s["metrics_before"].get(metric), s["metrics_after"].get(metric)
    lines = [
        f"task {s['task']}  loss {s['loss']}  precision {s['hyperparameters']['precision']}  "
        f"world size {s['world_size']}  steps/worker {s['steps_per_worker']}",
        f"{metric}: {before:.4f} -> {after:.4f}" if before is not None and after is not None else f"{metric}: {after}",
    ]
    if s.get("early_stopped_at_step"):
        lines.append(f"early stopping at step {s['early_stopped_at_step']} (train.early_stopping_patience)")
    final = (s.get("metrics_final") or {}).get(metric)
    if final is not None:
        step = (s.get("best_checkpoint") or {}).get("step") if s.get("final_checkpoint") == "best" else None
        lines.append(f"final/ = {s.get('final_checkpoint')} checkpoint" + (f" (step {step})" if step is not None else "") + f": eval {metric} {final:.4f}")
    if s.get("metrics_test"):
        lines.append(f"test {metric}: {s['metrics_test'].get(metric, float('nan')):.4f} ({s['test_rows']} rows)")
    lines += _baseline_lines(s.get("baseline"), s.get("verdict"), metric)
    if fused := fusion_line(s.get("fusion"), metric):
        lines.append(fused)
    if s.get("train_samples_per_second"):
        lines.append(f"train samples/s {s['train_samples_per_second']:.1f}  wall {s['wall_time_s']:.0f}s")
    lines.append(f"final model: {s['final_model']}")
    return "\n".join(lines)


def tune_summary(best: dict[str, Any]) -> str:
    """The report ``ce-ray tune`` ends with, from ``best.json``."""
    metric = best["metric"].removeprefix("eval_")
    lines = [
        f"{best['num_trials']} trials ({best['trials_stopped_early']} stopped early); best trial {best['trial_id']}: "
        f"{best['loss']} {json.dumps(best['params'])}: eval {metric} {best['value']:.4f}"
    ]
    if best.get("refit"):
        r = best["refit"]
        lines.append(
            f"refit on {r['train_rows']} training rows ({json.dumps(r['set'])}): eval {metric} {r['eval_value']:.4f} -> "
            f"{'exported' if r['chosen'] else 'not exported (worse than the trial on the eval rows)'}"
        )
    if best.get("test_score") is not None:
        lines.append(f"best/ ({best['exported']}): test {metric} {best['test_score']:.4f}")
    lines += _baseline_lines(best.get("baseline"), best.get("verdict"), metric)
    if fused := fusion_line(best.get("fusion"), metric):
        lines.append(fused)
    lines.append(f"best model: {best['best_dir']}  (report: {best.get('report_dir', '')})")
    return "\n".join(lines)
