"""``ce-ray demo``: the whole product, offline, on a dataset it writes itself.

``run`` holds the demo's steps (:func:`run_demo`); ``data`` writes its small dataset of real sentences.
"""

from ce_ray.demo.run import DemoError, run_demo

__all__ = ["DemoError", "run_demo"]
