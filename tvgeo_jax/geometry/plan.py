"""How a distance grid is cut into tiles and what it costs: memory and FLOPs per device.

``plan_grid`` picks the tile size ``tb`` (tasks per side of a ``[T, T]`` tile)
so that one tile's intermediates fit the memory budget, and counts the work
analytically; ``GridPlan.describe()`` is what ``--dry_run`` prints. Nothing here
touches a device. Estimates are upper-bound style (float32, ~4 live copies of
the largest per-pair buffer); the FLOPs count multiply-adds as 2.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Sequence

import numpy as np

F32 = 4
# Tile working set when no --max_memory is given (per device).
DEFAULT_TILE_BYTES = 512 * 2 ** 20


@dataclasses.dataclass(frozen=True)
class GridPlan:
  kind: str                 # "lora" | "dense"
  tasks: int
  layers: int
  out: int
  inn: int
  rank: int                 # LoRA r (padded max) or dense basis size k
  tile: int                 # tasks per tile side
  tiles: int                # tiles per layer (upper block triangle)
  devices: int
  tiles_per_device: int
  memory: Dict[str, int]    # bytes per device
  flops: Dict[str, float]   # whole grid, all devices

  def describe(self) -> str:
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB"
    m, f = self.memory, self.flops
    return "\n".join([
        f"distance grid plan: {self.kind}, T={self.tasks} tasks, L={self.layers} layers, "
        f"out={self.out}, in={self.inn}, r={self.rank}",
        f"  tiles: {self.tile} x {self.tile} tasks, {self.tiles} per layer "
        f"({self.tiles * self.layers} in all), {self.tiles_per_device} per layer on each of "
        f"{self.devices} device(s)",
        f"  memory per device: inputs {gib(m['inputs'])}, per-layer task data "
        f"{gib(m['layer_tasks'])}, one tile {gib(m['tile'])}, results {gib(m['results'])}; "
        f"total ~{gib(m['total'])}",
        f"  FLOPs: {f['min'] / 1e12:.2f} TFLOP when no pair is near and every angle is large; "
        f"{f['worst'] / 1e12:.2f} TFLOP if every pair takes the differenced L2/cosine and the "
        f"sine step (bases {f['bases'] / 1e12:.2f}, Grams {f['grams'] / 1e12:.2f}, "
        f"small cores/SVDs {f['cores'] / 1e12:.2f}, differenced {f['difference'] / 1e12:.2f}, "
        f"sines {f['sines'] / 1e12:.2f})",
    ])


def tile_starts(t: int, tile: int) -> np.ndarray:
  """``[n_tiles, 2]`` first tasks ``(i0, j0)`` of the upper block triangle's tiles.

  Block ``I`` starts at ``min(I · tile, T − tile)``: the last block overlaps its
  neighbour instead of holding padding tasks (no padded copy of the inputs).
  """
  nb = math.ceil(t / tile)
  bi, bj = np.triu_indices(nb)
  start = np.minimum(np.arange(nb) * tile, t - tile)
  return np.stack([start[bi], start[bj]], axis=1).astype(np.int32)


def _per_pair_bytes(kind, out, inn, r, n_factors):
  if kind == "lora":
    # differenced factors and their [d, 2r] concatenations; the sine step's [d, r] buffers;
    # Gram blocks, cores and SVD factors of the small matrices
    return F32 * (3 * (out + inn) * r + 4 * max(out, inn) * r + 12 * n_factors * r * r)
  return F32 * (3 * out * inn + 4 * out * r + 12 * r * r)


def _fixed_bytes(kind, t, l, out, inn, r, n_keys, devices):
  per_task = (out + inn) * r if kind == "lora" else out * inn
  inputs = F32 * t * l * per_task
  layer_tasks = F32 * t * (4 * per_task + (out * r if kind == "dense" else 0))
  results = F32 * n_keys * l * t * t // max(1, devices)
  return inputs, layer_tasks, results


def _least_work_tile(t: int, largest: int) -> int:
  """The tile size in ``[largest/2, largest]`` computing the fewest pairs (tiles x tile²,
  plus ~16 pairs' worth of fixed cost per tile): diagonal tiles compute both halves and
  the last block overlaps its neighbour."""
  def pairs(tb):
    tiles = math.ceil(t / tb) * (math.ceil(t / tb) + 1) // 2
    return tiles * (tb * tb + 16)
  return min(range(max(1, largest // 2), largest + 1), key=lambda tb: (pairs(tb), -tb))


def plan_grid(kind: str, t: int, l: int, out: int, inn: int, r: int, *, devices: int = 1,
              max_memory: Optional[int] = None, tile: Optional[int] = None,
              metrics: Sequence[str] = ("l2", "cosine", "grassmann"),
              factors: Sequence[str] = ("product",)) -> GridPlan:
  """The tiling and its cost for a ``T x T x L`` grid (``r``: LoRA rank, or the dense basis size).

  ``max_memory`` (bytes per device) bounds inputs + per-layer task data + results
  + one tile; ``tile`` forces the tile size.
  """
  n_keys = len(metrics) * len(factors)
  inputs, layer_tasks, results = _fixed_bytes(kind, t, l, out, inn, r, n_keys, devices)
  per_pair = _per_pair_bytes(kind, out, inn, r, len(factors))
  if tile is None:
    budget = DEFAULT_TILE_BYTES if max_memory is None else max_memory - inputs - layer_tasks - results
    if budget < per_pair:
      need = inputs + layer_tasks + results + per_pair
      raise ValueError(f"--max_memory={max_memory} bytes is below what the grid needs per device "
                       f"(inputs, task data and results {inputs + layer_tasks + results} bytes plus "
                       f"one pair {per_pair}); raise it to at least {need} or use more devices.")
    tile = _least_work_tile(t, int(min(t, max(1, math.isqrt(budget // per_pair)))))
  tile = max(1, min(int(tile), t))
  nb = math.ceil(t / tile)
  tiles = nb * (nb + 1) // 2
  per_dev = math.ceil(tiles / devices)
  tile_bytes = per_pair * tile * tile
  memory = {"inputs": inputs, "layer_tasks": layer_tasks, "tile": tile_bytes, "results": results,
            "total": inputs + layer_tasks + tile_bytes + results}
  pairs = tiles * tile * tile                        # pairs computed per layer (incl. padding)
  if kind == "lora":
    bases = 12.0 * t * (out + inn) * r * r
    grams = 2.0 * pairs * r * r * (out + inn)
    cores = pairs * len(factors) * (8.0 * r ** 3 + 20.0 * r ** 3)
    difference = 4.0 * pairs * (out + inn) * r * r
    sines = 6.0 * pairs * r * r * sum(inn if f == "a" else out for f in factors)
  else:
    bases = 14.0 * t * out * inn * min(out, inn)
    grams = 2.0 * pairs * (out * inn + (out * r * r if "grassmann" in metrics else 0))
    cores = pairs * 20.0 * r ** 3
    difference = 4.0 * pairs * out * inn
    sines = 6.0 * pairs * out * r * r
  if "grassmann" not in metrics:
    sines = 0.0
  flops = {k: v * l for k, v in dict(bases=bases, grams=grams, cores=cores,
                                     difference=difference, sines=sines).items()}
  flops["min"] = flops["bases"] + flops["grams"] + flops["cores"]
  flops["worst"] = flops["min"] + flops["difference"] + flops["sines"]
  return GridPlan(kind=kind, tasks=t, layers=l, out=out, inn=inn, rank=r, tile=tile, tiles=tiles,
                  devices=devices, tiles_per_device=per_dev, memory=memory, flops=flops)
