"""The search's progress on the console: a Tune callback (run by Tune's controller, in the driver) that
feeds :class:`ce_ray.console.TuneBoard` each trial's results, its end and, for a failed trial, its traceback."""

from __future__ import annotations

import time
from typing import Any

from ray import tune

from ce_ray import console

__all__ = ["ConsoleProgress"]

_DONE = ("TERMINATED", "ERROR")


class ConsoleProgress(tune.Callback):
    """Tell the console's :class:`~ce_ray.console.TuneBoard` about every trial result, finished and failed trial.

    Tune pickles its callbacks with the experiment (``tuner.pkl``) and a resumed search runs the
    unpickled one, so this holds plain values only and finds the console of the session it runs in.
    """

    def __init__(self, total: int, metric: str, mode: str, space: dict[str, Any]):
        self.total, self.metric, self.mode, self.keys = total, metric, mode, list(space)
        self._board: console.TuneBoard | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_board": None}

    def setup(self, **info):
        self._started = time.time()  # this session's start of the search (a resumed one too)

    def _board_for(self, trials) -> console.TuneBoard | None:
        if self._board is None and console.active() is not None:
            self._board = console.TuneBoard(console.active(), self.total, self.metric, self.mode)
            self._board.started = getattr(self, "_started", self._board.started)
            for t in trials:  # a resumed search: the trials it already has
                value = (t.metric_analysis.get(self.metric) or {}).get(self.mode)
                if value is not None:
                    self._board.seen(t.trial_id, value)
        return self._board

    def _counts(self, trials, ending=None) -> tuple[int, int]:
        """(trials done, trials running), counting ``ending`` (a trial this event ends) as done."""
        done = sum(t.status in _DONE and t is not ending for t in trials) + (ending is not None)
        running = sum(t.status == "RUNNING" and t is not ending for t in trials)
        return done, running

    def _params(self, trial) -> dict[str, Any]:
        return {k: trial.config[k] for k in self.keys if k in trial.config}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if board := self._board_for(trials):
            board.result(trial.trial_id, result, *self._counts(trials))

    def on_trial_complete(self, iteration, trials, trial, **info):
        if board := self._board_for(trials):
            board.finished(trial.trial_id, self._params(trial), trial.last_result or {}, *self._counts(trials, trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        if board := self._board_for(trials):
            error = ""
            if trial.error_file:
                try:
                    with open(trial.error_file) as f:
                        error = f.read()
                except OSError as exc:
                    error = f"(its error file {trial.error_file} could not be read: {exc})"
            board.failed(trial.trial_id, self._params(trial), error or "(no error recorded)", *self._counts(trials, trial))
