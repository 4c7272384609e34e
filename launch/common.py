"""Plumbing shared by the absl launch scripts: flags, one-line usage errors, --workdir checks,
a quiet console and config.json.

  _CONFIG, _WORKDIR = common.define_flags("demo.py")
  ...
  if __name__ == "__main__":
    common.run(main, validate=_validate)

Everything that can be checked without running (flag syntax, unknown config keys, config
values, --workdir) is checked before main starts, so a bad command line fails in one line and
leaves no file behind. By default the console shows progress bars, one line per stage
(`stage`) and the script's final output; library INFO logs (orbax, jax, absl, transformers)
appear only with --verbosity / -v (e.g. -v 0 for INFO). Errors raised in main print in full.
"""

from __future__ import annotations

import logging as pylogging
import os
import re
import sys
import time
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")
# Loggers whose INFO lines are chatter on a launch console.
_CHATTY = ("jax", "jaxlib", "orbax", "absl", "transformers", "datasets", "huggingface_hub",
           "matplotlib", "urllib3", "filelock", "tensorstore", "etils")
_T0 = time.time()


def define_flags(config_file: str) -> tuple[Any, Any]:
  """Defines --config (default `configs/<config_file>`) and --workdir; returns their holders."""
  try:
    config = config_flags.DEFINE_config_file(
        "config", os.path.join(_CONFIG_DIR, config_file),
        "ml_collections config file; override a field with --config.<field>=<value>.")
  except (AttributeError, KeyError) as e:  # it reads --config.<key> overrides from sys.argv
    _die(_config_key_message(e, sys.argv))
  workdir = flags.DEFINE_string("workdir", None, "Output dir for config, metrics and plots.")
  return config, workdir


def _one_line(message: Any) -> str:
  return " ".join(str(message).split())


def _die(message: Any) -> None:
  """Prints `<script>: error: <message>` as one line and exits with status 2 (usage)."""
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "launch"
  if prog in ("__main__.py", "-m", "-c"):
    prog = "launch"
  sys.stderr.write(f"{prog}: error: {_one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(2)


def _config_key_message(error: Exception, argv: list[str]) -> str:
  """ml_collections' AttributeError / KeyError for an unknown --config.<key> -> which flag."""
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(..))
    error = error.args[0]
  text = str(error.args[0] if error.args else error).strip("'\"")
  key = re.match(r"^([^'\"\n]+)", text)
  key = key.group(1) if key else text
  hint = re.search(r'Did you mean "([^"]+)"', text)
  bad = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and
         key in a.split("=", 1)[0][len("--config."):].split(".")]
  where = f" in {bad[0]}" if bad else ""
  return (f"unknown config key {key!r}{where}"
          + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
          + ". Check the field names in the config file (--config=...).")


def check_workdir(raw: str | None) -> str:
  """--workdir's absolute path, or app.UsageError: empty, a file, or the cwd / an ancestor."""
  from cast_jax import workdir as wd
  try:
    return wd.prepare_workdir(raw, what="--workdir", create=False)
  except wd.WorkdirError as e:
    raise app.UsageError(str(e)) from None


def quiet_console() -> None:
  """Hides library INFO logs unless --verbosity / -v was given on the command line."""
  if FLAGS["verbosity"].present:
    return
  FLAGS.verbosity = -1  # absl's WARNING; set explicitly, so absl does not raise it to INFO
  logging.set_verbosity(logging.WARNING)
  for name in _CHATTY:
    pylogging.getLogger(name).setLevel(pylogging.WARNING)
  # XLA / TensorFlow C++ logging and transformers read these when first imported.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def stage(message: str) -> None:
  """One console line per stage of a launch run, with the seconds since start."""
  print(f"[{time.time() - _T0:6.1f}s] {message}", flush=True)


def write_config(workdir: str, config: Any, **extra: Any) -> str:
  """Creates the workdir and writes `config.json` (the resolved config plus `extra`)."""
  from cast_jax import workdir as wd
  path = wd.prepare_workdir(workdir, what="--workdir")
  return wd.write_json(os.path.join(path, "config.json"), {**config.to_dict(), **extra})


def _parser(validate: Callable[[Any], None] | None) -> Callable[[list[str]], list[str]]:
  def parse(argv: list[str]) -> list[str]:
    try:
      rest = FLAGS(argv)
    except flags.Error as e:
      _die(f"{str(e).rstrip('.')}. Pass --helpshort to see the flags.")
    except (AttributeError, KeyError) as e:  # ml_collections: --config.<unknown key>=...
      _die(_config_key_message(e, argv))
    try:
      config = FLAGS["config"].value
      config.to_dict()  # a config file that failed to load raises here
    except Exception as e:  # pylint: disable=broad-except
      _die(f"cannot load the config file ({type(e).__name__}: {e}).")
    try:
      if validate is not None:
        validate(config)
      check_workdir(FLAGS.workdir)
    except app.UsageError as e:
      _die(e)
    quiet_console()
    return rest
  return parse


def run(main: Callable[[list[str]], Any], *, validate: Callable[[Any], None] | None = None
        ) -> None:
  """`app.run(main)` with --workdir required, one-line usage errors and the config checked by
  `validate(config)` (raising app.UsageError) before main runs."""
  flags.mark_flag_as_required("workdir")
  app.run(main, flags_parser=_parser(validate))
