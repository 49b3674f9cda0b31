"""Layer 0: what every other package leans on and that knows nothing of models or tasks:
atomic file I/O, cache paths, pytree paths, the offline/hub guard, figure helpers,
metrics, device meshes."""
