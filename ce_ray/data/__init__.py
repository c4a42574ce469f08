"""From a job's data sources to rows every worker can read, in one direction.

=============  ===============================================================================
module         step
=============  ===============================================================================
``read``       1. load a source (file, URI, hub dataset) as a ``pyarrow.Table``
``check``      2. check rows for the task and split; canonical columns; row-numbered errors
``groups``     3. rerank training rows grouped by query
``mining``     4. hard negatives where the loss needs them and the rows have none
``shape``      5. the exact columns of the job's loss (pure)
``prepare``    runs 1-5 once each, in order, caches the result as Arrow files (6. write)
``on_cluster`` the same for data.train as a Ray task off the driver, mining with Ray Data actor pools
=============  ===============================================================================
"""

from ce_ray.data.check import CheckedRows, check_rows
from ce_ray.data.errors import DataError
from ce_ray.data.groups import RerankGroups, rerank_groups
from ce_ray.data.mining import mine_negatives, needs_mining
from ce_ray.data.prepare import (
    PreparedData,
    PreparedSplit,
    check_batch_fits,
    load_prepared,
    load_split,
    prepare_data,
    prepare_split,
)
from ce_ray.data.read import read_source
from ce_ray.data.shape import shape_rows

__all__ = [
    "CheckedRows",
    "DataError",
    "PreparedData",
    "PreparedSplit",
    "RerankGroups",
    "check_batch_fits",
    "check_rows",
    "load_prepared",
    "load_split",
    "mine_negatives",
    "needs_mining",
    "prepare_data",
    "prepare_split",
    "read_source",
    "rerank_groups",
    "shape_rows",
]
