"""glibc keeps freed memory for reuse (core.host_memory): a freed 96 MiB block (over a thread
arena's 64 MiB heaps) is handed back to the worker thread that freed it without page faults,
where glibc's defaults (TVGEO_KEEP_FREED_MEMORY=0) fault it in anew."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from absl.testing import absltest

# A fresh interpreter (the suite's own process already has the setting): call
# keep_freed_memory, start a thread (as XLA's workers start after it), and count the minor
# page faults of filling a 96 MiB block the thread allocated, filled and freed just before.
_PROBE = textwrap.dedent("""
    import ctypes, resource, threading
    from tvgeo_jax.core import host_memory
    applied = host_memory.keep_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 96 << 20
    faults = []
    def fill():
      p = libc.malloc(size)
      ctypes.memset(p, 1, size)
      return p
    def worker():
      libc.free(fill())
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      p = fill()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      libc.free(p)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    print(applied, faults[0])
""")


def _probe(setting: str):
  env = {**os.environ, "TVGEO_KEEP_FREED_MEMORY": setting}
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  return out[0] == "True", int(out[1])


@absltest.skipUnless(sys.platform.startswith("linux"), "glibc's mallopt: Linux only")
class KeepFreedMemoryTest(absltest.TestCase):

  def test_a_freed_block_is_reused_without_page_faults(self):
    applied, faults = _probe("1")
    self.assertTrue(applied)
    self.assertLess(faults, 100)   # 96 MiB is 24,576 pages of 4 KiB

  def test_glibc_defaults_fault_the_block_in_again_and_the_switch_restores_them(self):
    applied, faults = _probe("0")
    self.assertFalse(applied)
    self.assertGreater(faults, 20_000)


if __name__ == "__main__":
  absltest.main()
