"""Release the placement group of a stopped or crashed Tune trial's Ray Train workers.

Upstream: https://github.com/ray-project/ray/issues/54305 (Ray Train V2 under Tune).

What goes wrong: when Tune stops a trial (ASHA) it kills the trial's driver function; Train V2's
controller dies with it, but the placement group it made for the workers lives as long as the Tune
driver's job, so every stopped trial keeps its CPUs/GPUs and later trials wait forever. The same holds
when a trial's driver crashes (e.g. the node's OOM killer took it) and Tune retries the trial: the
retry waits for the CPUs/GPUs of its own dead attempt.

The workaround, in two halves: each Train worker records its placement group id
(:func:`placement_group_id`, stored in the worker's stats file), and a Tune callback
(:class:`ReleaseWorkerGroups`) removes that group when the trial completes, errors or is retried.

Remove when: the issue is closed and the Ray floor in pyproject.toml includes the fix; then
``tests/test_tune.py`` (``test_nli_search_stops_a_bad_trial_early_and_exports_the_best``, which checks no
placement group stays reserved, and ``test_a_trial_whose_driver_crashes_is_retried_on_the_cpus_it_held``)
must still pass without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from ray import tune

__all__ = ["ReleaseWorkerGroups", "placement_group_id"]

logger = logging.getLogger(__name__)

STATS_KEY = "placement_group_id"


def placement_group_id() -> str | None:
    """The id of the placement group this Ray worker runs in (hex), or None."""
    import ray

    pg = ray.util.get_current_placement_group()
    return pg.id.hex() if pg is not None else None


class ReleaseWorkerGroups(tune.Callback):
    """Remove the placement groups a trial's workers recorded, once the trial is over or retried.

    Args:
        worker_stats: ``trial -> the stats dicts its workers wrote`` (each may hold ``placement_group_id``).
    """

    def __init__(self, worker_stats: Callable[[tune.experiment.Trial], Iterable[dict]]):
        self.worker_stats = worker_stats

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._release(trial)  # before the retry starts: the stats still name the failed attempt's group

    def _release(self, trial) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        for stats in self.worker_stats(trial):
            pg_id = stats.get(STATS_KEY)
            if not pg_id:
                continue
            pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id)))
            if placement_group_table(pg).get("state") not in (None, "REMOVED"):
                logger.info("trial %s: releasing its workers' placement group %s", trial.trial_id, pg_id)
                remove_placement_group(pg)
