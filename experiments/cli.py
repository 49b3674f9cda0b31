"""What every entry point shares: how it starts, how it reports failure, how it exits.

``cli.run(main)`` replaces ``app.run(main)``:
- flag mistakes and ``app.UsageError``: one line ``<command>: error: ...``, exit 2;
- expected errors (bad files, incompatible inputs, the hub unreachable offline, a
  non-finite loss): one line ``<command>: error: ...``, exit 1; the traceback only with
  ``--verbosity=1``;
- Ctrl-C: ``<command>: interrupted ...``, exit 130;
- anything else is a bug and keeps its traceback.
Third-party INFO logs (orbax writes dozens per checkpoint) show only with ``--verbosity=1``.
"""
from __future__ import annotations

import logging as std_logging
import os
import sys
import traceback
from typing import Callable, Sequence

from absl import app, flags, logging

FLAGS = flags.FLAGS
_OURS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
              for d in ("tvgeo_jax", "experiments"))


def command_name(main: Callable) -> str:
  module = getattr(main, "__module__", "") or ""
  if module == "__main__":
    module = os.path.splitext(os.path.basename(sys.argv[0]))[0]
  return module.rsplit(".", 1)[-1] or "tvgeo_jax"


def _is_ours(path: str) -> bool:
  return os.path.abspath(path).startswith(_OURS)


def is_expected(error: BaseException) -> bool:
  """An error a user can fix from its message (not a bug in this code)."""
  from tvgeo_jax import hub
  if isinstance(error, (OSError, hub.HubUnavailableError)):
    return True  # files, permissions, the network: the environment, not the code
  if isinstance(error, (ValueError, FloatingPointError)):
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and _is_ours(frames[-1].filename)  # raised by a check of ours
  return type(error).__name__ == "StopRequested"


class _ThirdPartyInfoFilter(std_logging.Filter):
  def filter(self, record):
    return record.levelno >= std_logging.WARNING or _is_ours(record.pathname)


def _one_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
    text = f"{text}: {error.filename}"
  return " ".join(text.split())


def _guarded(main: Callable, name: str, argv: Sequence[str]):
  if FLAGS.verbosity < 1:
    logging.get_absl_handler().addFilter(_ThirdPartyInfoFilter())
  try:
    return main(argv)
  except app.UsageError as e:
    sys.stderr.write(f"{name}: error: {e}\n(see --helpshort)\n")
    sys.exit(2)
  except KeyboardInterrupt:
    sys.stderr.write(f"\n{name}: interrupted; rerun the same command to resume.\n")
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    if not is_expected(e):
      raise
    if FLAGS.verbosity >= 1:
      traceback.print_exc()
    word = "stopped" if type(e).__name__ == "StopRequested" else "error"
    sys.stderr.write(f"{name}: {word}: {_one_line(e)}\n")
    sys.exit(1)


def _parse_flags(name: str):
  def parse(argv):
    try:
      return FLAGS(argv)
    except flags.Error as e:
      sys.stderr.write(f"{name}: error: {e}\n(see --helpshort)\n")
      sys.exit(2)
  return parse


def run(main: Callable) -> None:
  """``app.run(main)`` with this project's error handling and exit codes."""
  name = command_name(main)
  app.run(lambda argv: _guarded(main, name, argv), flags_parser=_parse_flags(name))
