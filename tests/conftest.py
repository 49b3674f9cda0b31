"""Settings every test module shares, applied before any of them imports jax.

* The CPU backend (``JAX_PLATFORMS=cpu``): the suite's numbers are CPU numbers (parity
  and bitwise checks); a GPU machine runs it the same way.
* One persistent XLA compilation cache for in-process tests and the CLIs they start
  (``JAX_COMPILATION_CACHE_DIR``, inherited by subprocesses): a program compiled by one
  test file (or a previous run) is loaded, not recompiled, by the next.
* Quiet third-party logs.
* glibc keeps freed memory for reuse (``core.host_memory``), as the CLIs do.

Shared fixtures (tiny configs, small tasks, batches) live in ``test_training_fixtures``;
``tests/`` is on ``sys.path`` because this file is here.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.environ.get("TVGEO_CACHE", os.path.expanduser("~/.cache/tvgeo_jax")),
                 "xla-tests"))

from tvgeo_jax.core import host_memory  # noqa: E402  (imports no jax)

host_memory.keep_freed_memory()
