"""Command-line experiments (``python -m experiments.<name>``), thin over tvgeo_jax.

Importing this package, before any entry point imports jax, tells glibc to keep freed
memory for reuse (``tvgeo_jax.core.host_memory``): settled before any thread exists, every
thread allocates from the one main heap, and XLA's CPU programs stop page-faulting their
temporaries in at every call.
"""
from tvgeo_jax.core import host_memory as _host_memory

_host_memory.keep_freed_memory()
