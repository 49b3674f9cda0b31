"""Layer 2: the one home of evaluation, used by training, the merge study, one-vs-rest
and the representation study.

* ``task_data``: a task tokenised and batched (``TaskData``: training batches in their
  seeded order, eval batches, label metadata).
* ``losses``: per-example loss, class and row weights, the weighted mean objective.
* ``scoring``: the compiled eval step, predictions over a split, the split's metrics.
* ``model_scores``: scores of saved or merged parameter trees, one at a time or stacked.
"""
from tvgeo_jax.evaluation.model_scores import (DEFAULT_CHUNK, SPLITS, cached_task_data,
                                               evaluate, evaluate_stacked, set_task_data,
                                               split_shared)

__all__ = ["DEFAULT_CHUNK", "SPLITS", "cached_task_data", "evaluate", "evaluate_stacked",
           "set_task_data", "split_shared"]
