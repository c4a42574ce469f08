"""Hyperparameter search: Ray Tune runs one Ray Train ``TorchTrainer`` per trial.

=============  =============================================================================
module         what it holds
=============  =============================================================================
``driver``     :func:`run_tuning`: checks before Ray, the experiment, refit, ``best/``
``space``      the search space: defaults, validation, Tune domains, the searcher; a trial's and the
               refit's job
``report``     ``trials.csv``, plots and ``report.md``/``report.html``
=============  =============================================================================

The ray#54305 workaround the experiment needs lives in :mod:`ce_ray.workarounds.ray_54305`.
"""

from ce_ray.tuning.space import search_space

__all__ = ["TuneOutcome", "run_tuning", "search_space"]


def __getattr__(name: str):
    # The driver (Ray Tune, Ray Train, torch: ~5 s of imports) loads on first use, so `ce-ray validate` and a bad
    # config fail in a second.
    if name in ("TuneOutcome", "run_tuning"):
        from ce_ray.tuning import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
