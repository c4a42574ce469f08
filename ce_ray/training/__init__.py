"""Distributed training: one ``CrossEncoderTrainer`` per Ray Train worker, real DDP.

=================  =========================================================================
module             what it holds
=================  =========================================================================
``driver``         :func:`run_training`: data, ``TorchTrainer``, ``final/``, ``summary.json``
``recipe``         what each worker runs (the notebook's recipe, sharded) and its arguments
``callbacks``      reporting to Ray Train at each save; early stopping decided on rank 0
``checkpoint``     which checkpoint becomes ``final/``, staged and published
``card``           the model card of ``final/`` (and tune's ``best/``): trainer's card data + the run's facts
``batching``       length-grouped batches
``instrument``     per-worker counters and statistics (rows, timings, memory, checksums)
=================  =========================================================================
"""

from ce_ray.training.driver import TrainOutcome, make_trainer, run_training

__all__ = ["TrainOutcome", "make_trainer", "run_training"]
