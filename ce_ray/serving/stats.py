"""Every model replica's counters in one place, so that ``GET /info`` lists them all.

A request through the app's handle reaches one replica; to report all of them, each replica pushes
its counters to one small actor per app (:class:`StatsBoard`, no CPUs) every ``PUSH_INTERVAL_S``
from a background thread, and removes them when Serve stops it (scale-down, redeploy). A replica
that has not pushed for ``STALE_AFTER_S`` (its process killed, its node lost) is left out.
:func:`~ce_ray.serving.app.stop_server` removes the board with its app.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import ray

__all__ = ["PUSH_INTERVAL_S", "STALE_AFTER_S", "StatsPusher", "board_for", "remove_board"]

logger = logging.getLogger(__name__)

PUSH_INTERVAL_S = 1.0
STALE_AFTER_S = 5.0
_NAMESPACE = "ce-ray"


@ray.remote(num_cpus=0)
class StatsBoard:
    """replica id -> (time of its last push, its counters)."""

    def __init__(self):
        self._stats: dict[str, tuple[float, dict]] = {}

    def put(self, replica: str, stats: dict) -> None:
        self._stats[replica] = (time.monotonic(), stats)

    def remove(self, replica: str) -> None:
        self._stats.pop(replica, None)

    def read(self) -> list[dict]:
        now = time.monotonic()
        self._stats = {r: (t, s) for r, (t, s) in self._stats.items() if now - t <= STALE_AFTER_S}
        return [s for _, s in sorted(self._stats.values(), key=lambda entry: entry[1].get("replica", ""))]


def _name(app: str) -> str:
    return f"stats:{app}"


def _board(app: str):
    # Detached: it must outlive whichever replica created it (replicas come and go); stop_server removes it.
    # Restarted (empty) if its node is lost: the replicas' handles reach the new one, which refills within a push.
    return StatsBoard.options(
        name=_name(app), namespace=_NAMESPACE, get_if_exists=True, lifetime="detached", max_restarts=-1
    ).remote()


def board_for(app: str):
    """``app``'s board (``await board.read.remote()``: its live replicas' counters), or None before the first push."""
    try:
        return ray.get_actor(_name(app), namespace=_NAMESPACE)
    except ValueError:
        return None


def remove_board(app: str) -> None:
    try:
        ray.kill(ray.get_actor(_name(app), namespace=_NAMESPACE))
    except ValueError:
        pass


class StatsPusher:
    """Pushes ``collect()`` for ``replica`` to ``app``'s board now and then every ``PUSH_INTERVAL_S``."""

    def __init__(self, app: str, replica: str, collect: Callable[[], dict]):
        self._replica, self._collect = replica, collect
        self._board = _board(app)
        self._stop = threading.Event()
        self.push()
        self._thread = threading.Thread(target=self._run, name="ce-ray-stats", daemon=True)
        self._thread.start()

    def push(self) -> None:
        self._board.put.remote(self._replica, self._collect())  # fire and forget: never blocks scoring

    def _run(self) -> None:
        while not self._stop.wait(PUSH_INTERVAL_S):
            try:
                self.push()
            except Exception:  # the board is gone (app deleted) or Ray is shutting down
                logger.debug("pushing replica stats failed", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        try:
            self._board.remove.remote(self._replica)
        except Exception:
            pass
