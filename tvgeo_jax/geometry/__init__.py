"""Task-vector geometry: L2, cosine and Grassmann distances between task vectors.

* ``pairwise``: two matrices or two LoRA factor pairs (dense and factored kernels);
* ``grid``: all task pairs x layers of a module stack in one jitted call, tiles
  sharded over the devices (``distance_grid``, ``distance_grids``, ``DistanceGrid``);
* ``tiles``: one ``tb x tb`` tile of the pair matrices; ``plan``: tile size, memory
  and FLOPs (``plan_grid``, ``GridPlan``, what ``--dry_run`` prints);
* ``outputs``: ``write_distance_outputs`` (npz, json, figures);
* ``linalg``: the numerical building blocks (full-precision products, bases,
  accurate principal angles);
* ``subspace_similarity`` (LoRA φ of Hu et al. 2021), ``intruders`` (Shuttleworth et al.
  2024) and their files and figures, ``measure_outputs``.
"""
from tvgeo_jax.geometry.intruders import intruder_dimensions
from tvgeo_jax.geometry.subspace_similarity import subspace_similarity_grid
from tvgeo_jax.geometry.grid import (FACTORS, METRICS, DistanceGrid, distance_grid,
                                     distance_grids, grid_arrays, grid_plan)
from tvgeo_jax.geometry.plan import GridPlan, plan_grid
from tvgeo_jax.geometry.outputs import summary, write_distance_outputs
from tvgeo_jax.geometry.pairwise import (cosine_distance, dense_basis, grassmann_distance,
                                         l2_distance, lora_cosine_distance,
                                         lora_grassmann_distance, lora_inner,
                                         lora_l2_distance, lora_principal_angles,
                                         numerical_rank, pad_rank, principal_angles)

__all__ = [
    "FACTORS", "METRICS", "DistanceGrid", "GridPlan", "distance_grid", "distance_grids",
    "grid_arrays", "grid_plan", "pad_rank", "plan_grid",
    "summary", "write_distance_outputs", "cosine_distance", "dense_basis",
    "grassmann_distance", "l2_distance", "lora_cosine_distance", "lora_grassmann_distance",
    "lora_inner", "lora_l2_distance", "lora_principal_angles", "numerical_rank",
    "principal_angles", "intruder_dimensions", "subspace_similarity_grid",
]
