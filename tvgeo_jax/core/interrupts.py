"""Ctrl-C that waits for a critical section (a checkpoint save) to end.

Orbax catches what interrupts its save bookkeeping, logs it with a traceback, and
re-raises: a Ctrl-C that lands inside ``wait_until_finished`` prints a page of orbax
internals before our one-line "interrupted" message. Inside ``deferred_interrupt()`` a
SIGINT is only noted; the block runs to its end (the save completes), then
KeyboardInterrupt is raised as if the signal had come just after it.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
  """Run the block to its end under Ctrl-C, then raise the KeyboardInterrupt it got.

  A no-op off the main thread (Python delivers signals only there) and where SIGINT is not
  Python's default handler (ignored, or a handler of the caller's that we leave alone).
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield
    return
  pending = []
  signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  if pending:
    raise KeyboardInterrupt
