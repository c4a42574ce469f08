"""The error every data step raises for rows that do not fit the job."""

from __future__ import annotations

from ce_ray.config import ConfigError

__all__ = ["DataError"]


class DataError(ConfigError):
    """Rows that do not fit the task; the message names the data key, the rows and the fix."""
