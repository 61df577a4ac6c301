"""What a run shows: a quiet console, a full log file, short errors.

The console (stderr) shows et_flax's own lines: a short header, one line per
epoch, a closing line, and within an epoch a progress bar (`EpochProgress`).
Everything the libraries log (absl, orbax, tfds, TensorFlow, JAX, clu,
Python warnings) goes in full to `<workdir>/log.txt` instead (`setup_logging`);
`--verbose` shows it on the console too. An error the user can fix (a config
field that does not exist, a missing file, a busy workdir, a full disk)
prints `error: <message>` and exits 1, its traceback going to the log; any
other error keeps its traceback (`run`).

et_flax code writes a console line with `info(message, *args)` (printf-style,
as `logging.info`); it also goes to the log file. Without `setup_logging` (a
test, a script that configures logging itself) these are ordinary INFO
records of the `et_flax.console` logger. A process that runs a command
inside itself and goes on (a test) undoes what it set up with `State`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import errno
import functools
import importlib.util
import io
import logging
import os
import pathlib
import re
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import tqdm
from absl import app
from absl import flags
from absl import logging as absl_logging

from et_flax import workdir_lock

class TensorFlowMissingError(ValueError):
  """TensorFlow is needed (to prepare or decode data) but not installed."""


def _import_tensorflow_quietly() -> list[str]:
  """Imports TensorFlow, keeping what its native code writes to stderr meanwhile.

  Its shared libraries log a few lines while they load, before TensorFlow
  applies TF_CPP_MIN_LOG_LEVEL (TensorFlow 2.21: oneDNN's 'custom operations
  are on' note, behind absl's 'All log messages before absl::InitializeLog()'
  line). They are written to file descriptor 2 directly; they go to the log
  file instead. A failed import shows them at once.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except BaseException:
      os.dup2(saved, 2)
      capture.seek(0)
      sys.stderr.write(capture.read().decode(errors='replace'))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    capture.seek(0)
    return capture.read().decode(errors='replace').splitlines()


# What TensorFlow's native code wrote while it loaded, until a log file takes it.
_native_startup_lines: list[str] = []


def import_tensorflow(purpose: str, module: str = 'tensorflow') -> Any:
  """`module` (TensorFlow, or tensorflow_datasets, which imports it), imported
  for `purpose` ('decoding the val split', say), quietly.

  TensorFlow prepares and decodes data only: everything else in et_flax runs
  without it (a run whose splits are decoded and cached imports none).

  Raises:
    TensorFlowMissingError: it is not installed, saying what needed it and
      how to install it.
  """
  if 'tensorflow' not in sys.modules:
    if importlib.util.find_spec('tensorflow') is None:
      raise TensorFlowMissingError(
          f'TensorFlow is not installed, and {purpose} needs it (et_flax prepares and '
          "decodes data with tf.data). Install it with `pip install -e '.[tf]'` (the CPU "
          'build) or `pip install tensorflow`, or run where the splits are already '
          'decoded and cached (see Data in README.md)')
    lines = []
    if not _verbose:
      # TensorFlow's C++ logging reads its level once, as it loads. '2' keeps
      # its INFO and WARNING lines (CPU instruction notes, tf.data's
      # end-of-sequence notes) off the console; a TF_CPP_MIN_LOG_LEVEL already
      # set (JAX sets '1' where it is imported first), or --verbose, leaves it.
      os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
      lines = _import_tensorflow_quietly()
    if _log is not None:
      for line in lines:
        logging.getLogger('tensorflow').info('(while loading) %s', line)
    else:
      _native_startup_lines.extend(lines)
    _quiet_tensorflow_loggers()
  return importlib.import_module(module)


CONSOLE_LOGGER = 'et_flax.console'
LOG_FILE = 'log.txt'
# Progress lines where the output is not a terminal: at most one per this.
LINE_INTERVAL_SECONDS = 30.0
# A live bar's statistics (and the loss it fetches from the device): at most
# this often.
BAR_STATS_INTERVAL_SECONDS = 0.5
# A live bar's line: at most this many columns.
MAX_BAR_LINE = 110
# The statistics after a bar take this width from the start (the bar keeps its own).
BAR_STATS_WIDTH = len('ETA 0:00:00, 0000 img/s, loss 0.0000')
# Log lines held in memory until the workdir holds a run (see WorkdirLog).
HELD_LINES = 50_000

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_logger = logging.getLogger(CONSOLE_LOGGER)
_logger.setLevel(logging.INFO)
# Errors: their tracebacks, to the log file only.
_errors_logger = logging.getLogger('et_flax.errors')


def info(message: str, *args: Any) -> None:
  """A console line (and a log-file line): `message % args`."""
  if not logging.root.handlers:
    logging.basicConfig()  # as absl does: a record with no handler is lost
  _logger.info(message, *args, stacklevel=2)


def warning(message: str, *args: Any) -> None:
  """A console line starting 'warning: ' (and a log-file line)."""
  if not logging.root.handlers:
    logging.basicConfig()
  _logger.warning(message, *args, stacklevel=2)


def _on_console(record: logging.LogRecord) -> bool:
  """Records the console shows: `info`/`warning`, and et_flax's own absl warnings."""
  if record.name == CONSOLE_LOGGER:
    return True
  return (record.name == 'absl' and record.levelno >= logging.WARNING
          and record.pathname.startswith(_PACKAGE_DIR))


def _not_on_console(record: logging.LogRecord) -> bool:
  return not _on_console(record)


class ConsoleHandler(logging.Handler):
  """Writes console records to stderr as plain lines, above a live progress bar."""

  def __init__(self):
    super().__init__()
    self.addFilter(_on_console)

  def emit(self, record: logging.LogRecord) -> None:
    try:
      text = record.getMessage()
      if record.levelno >= logging.WARNING:
        text = f'{logging.getLevelName(record.levelno).lower()}: {text}'
      stream = sys.stderr  # read now: a notebook or a test may replace it
      with tqdm.tqdm.external_write_mode(file=stream):
        stream.write(text + '\n')
        stream.flush()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def _holds_a_run(workdir: pathlib.Path) -> bool:
  """Whether `workdir` holds anything but a run lock and logs."""
  try:
    names = os.listdir(workdir)
  except OSError:
    return False
  return any(name != workdir_lock.RUN_LOCK_FILE and not name.startswith('log.')
             for name in names)


class WorkdirLog(logging.Handler):
  """The full log, appended to `<workdir>/<name>` once the workdir holds a run.

  Until then (a new workdir: a run refused at its start leaves nothing there,
  see workdir_lock.RunLock.release) the lines are held in memory and written
  when the run writes its first file. Without a workdir, or with one that
  cannot be written, they stay held (the last HELD_LINES; --verbose shows
  them).
  """

  def __init__(self, workdir: str | os.PathLike | None, name: str = LOG_FILE):
    super().__init__()
    self.setFormatter(absl_logging.PythonFormatter())
    self.workdir = None if workdir is None else pathlib.Path(workdir)
    self.path: pathlib.Path | None = None if workdir is None else self.workdir / name
    self._held: collections.deque[str] = collections.deque(maxlen=HELD_LINES)
    self._file: TextIO | None = None
    # Set once the file could not be written (a full disk): nothing more goes there.
    self.stopped_by: OSError | None = None
    self._open_when_ready()

  def _open_when_ready(self) -> None:
    if self._file is not None or self.path is None or not _holds_a_run(self.workdir):
      return
    try:
      self._file = self.path.open('a', encoding='utf-8')
    except OSError:
      self.path = None  # read-only: held, as without a workdir
      return
    self._file.writelines(self._held)
    self._file.flush()
    self._held.clear()

  def emit(self, record: logging.LogRecord) -> None:
    if self.stopped_by is not None:
      return
    try:
      text = self.format(record) + '\n'
      self._open_when_ready()
      if self._file is None:
        self._held.append(text)
      else:
        self._file.write(text)
        self._file.flush()
    except OSError as error:  # a full disk: said once, not a traceback per record
      self._stop_writing(error)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)

  def _stop_writing(self, error: OSError) -> None:
    """Stops writing the log file, saying so on the console once."""
    self.stopped_by = error
    file, self._file = self._file, None
    if file is not None:
      # Closing flushes the lines the disk refused: they cannot be written either.
      with contextlib.suppress(OSError):
        file.close()
    stream = sys.stderr
    with tqdm.tqdm.external_write_mode(file=stream):
      stream.write(f'warning: cannot write {self.path} ({error.strerror or error}): the '
                   'log stops here; the console lines go on\n')
      stream.flush()

  def written_to(self) -> pathlib.Path | None:
    """The log file, or None while the lines are held or once it stopped."""
    with self.lock:
      if self.stopped_by is not None:
        return None
      self._open_when_ready()
      return None if self._file is None else self.path

  def close(self) -> None:
    with self.lock:
      if self._file is not None:
        try:
          self._file.close()
        except OSError as error:
          self._stop_writing(error)
        self._file = None
    super().close()


_installed: list[logging.Handler] = []
_log: WorkdirLog | None = None
_verbose = False


def log_file_name(process_index: int = 0) -> str:
  """log.txt for process 0 of a run, log.process<i>.txt for the others."""
  return LOG_FILE if not process_index else f'log.process{process_index}.txt'


def setup_logging(workdir: str | os.PathLike | None, verbose: bool = False,
                  process_index: int = 0) -> None:
  """Console lines to stderr; every log record to the workdir's log file.

  Library logs reach the console only with `verbose`. Idempotent: a second
  call replaces the first (e.g. once the process index of a run is known).
  `workdir` None keeps the log in memory (see `WorkdirLog.keep`).
  """
  global _log, _verbose
  root = logging.getLogger()
  for handler in _installed:
    root.removeHandler(handler)
    handler.close()
  _installed.clear()
  absl_handler = absl_logging.get_absl_handler()
  absl_handler.removeFilter(_not_on_console)
  if verbose:
    absl_logging.use_absl_handler()
    absl_handler.addFilter(_not_on_console)  # the console handler shows those
  else:
    root.removeHandler(absl_handler)
  # Every INFO record to the log file (a notebook's root logger starts at WARNING).
  if root.level == logging.NOTSET or root.level > logging.INFO:
    root.setLevel(logging.INFO)
  if logging.getLogger('absl').level > logging.INFO:
    logging.getLogger('absl').setLevel(logging.INFO)
  logging.captureWarnings(True)
  _log = WorkdirLog(workdir, log_file_name(process_index))
  _verbose = verbose
  # Exceptions Python cannot raise: to the log file, as the libraries' logs.
  sys.unraisablehook = sys.__unraisablehook__ if verbose else _unraisable_to_log
  _quiet_tensorflow_loggers()
  _installed.extend([_log, ConsoleHandler()])
  for handler in _installed:
    root.addHandler(handler)
  logging.getLogger('et_flax').info(
      'et_flax started %s (PID %d): %s',
      datetime.datetime.now().isoformat(timespec='seconds'), os.getpid(), ' '.join(sys.argv))
  for line in _native_startup_lines:
    logging.getLogger('tensorflow').info('(while loading) %s', line)
  _native_startup_lines.clear()


def _unraisable_to_log(unraisable: Any) -> None:
  """An exception Python cannot raise, as a log record: TensorStore's reads
  still under way when Orbax gives up on a damaged checkpoint end on a closed
  event loop, one traceback each."""
  logging.getLogger('unraisable').warning(
      '%s: %r', unraisable.err_msg or 'Exception ignored in', unraisable.object,
      exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))


def _quiet_tensorflow_loggers() -> None:
  """Keeps the console to et_flax's lines once TensorFlow is loaded (not --verbose)."""
  if _log is None or _verbose:
    return
  # TensorFlow gives its logger a handler of its own when loaded before any.
  for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
    for handler in list(getattr(logger, 'handlers', ())):
      if (type(handler) is logging.StreamHandler  # pylint: disable=unidiomatic-typecheck
          and handler.stream in (sys.stderr, sys.stdout)):
        logger.removeHandler(handler)
  tfds = sys.modules.get('tensorflow_datasets')
  if tfds is not None:
    tfds.disable_progress_bar()


class _LogWriter(io.TextIOBase):
  """A text stream whose lines become INFO records of `logger`."""

  def __init__(self, logger: logging.Logger):
    super().__init__()
    self.logger, self._line = logger, ''

  def write(self, text: str) -> int:
    *lines, self._line = (self._line + text).split('\n')
    for line in lines:
      if line.strip():
        self.logger.info('%s', line)
    return len(text)

  def flush(self) -> None:
    if self._line.strip():
      self.logger.info('%s', self._line)
    self._line = ''


@contextlib.contextmanager
def library_output() -> Iterator[None]:
  """What a library prints on stdout goes to the log file (unless --verbose)."""
  if _log is None or _verbose:
    yield
    return
  writer = _LogWriter(logging.getLogger('stdout'))
  try:
    with contextlib.redirect_stdout(writer):
      yield
  finally:
    writer.flush()


def log_path() -> pathlib.Path | None:
  """The log file `setup_logging` writes to, once it exists."""
  return None if _log is None else _log.written_to()


@dataclasses.dataclass(frozen=True)
class State:
  """The console and logging as they are at one time (`save`), to go back to.

  It holds what `setup_logging` (so a command's `run`) changes: the console's
  handlers, log and verbosity, every logger's handlers and level, the absl
  handler's filters, whether warnings are logged, and `sys.unraisablehook`.
  A process that runs a command inside itself and goes on (a test) saves it
  first and restores it after:

    state = console.State.save()
    ...  # a command's `run`
    state.restore()
  """
  installed: tuple[logging.Handler, ...]
  log: WorkdirLog | None
  verbose: bool
  loggers: tuple[tuple[logging.Logger, tuple[logging.Handler, ...], int], ...]
  absl_filters: tuple[Any, ...]
  warnings_logged: bool
  unraisablehook: Callable[[Any], Any]

  @classmethod
  def save(cls) -> State:
    """The state now."""
    loggers = [logging.getLogger(), *(
        logger for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger))]
    return cls(
        installed=tuple(_installed), log=_log, verbose=_verbose,
        loggers=tuple((logger, tuple(logger.handlers), logger.level) for logger in loggers),
        absl_filters=tuple(absl_logging.get_absl_handler().filters),
        # logging has no public way to ask whether it captures warnings.
        warnings_logged=(
            logging._warnings_showwarning is not None),  # pylint: disable=protected-access
        unraisablehook=sys.unraisablehook)

  def restore(self) -> None:
    """Goes back to this state, closing the console's handlers set up since.

    Loggers made since keep their handlers and levels; restoring again is
    harmless.
    """
    global _log, _verbose
    for handler in _installed:
      if handler not in self.installed:
        handler.close()
    _installed[:] = self.installed
    _log, _verbose = self.log, self.verbose
    for logger, handlers, level in self.loggers:
      logger.handlers[:] = handlers
      logger.setLevel(level)
    absl_logging.get_absl_handler().filters[:] = self.absl_filters
    if not self.warnings_logged:
      logging.captureWarnings(False)
    sys.unraisablehook = self.unraisablehook


# ---------------------------------------------------------------------------
# Errors.

# A full disk or quota: the errnos, and the words of their messages as
# TensorStore (under Orbax's RESOURCE_EXHAUSTED) and other libraries pass them on.
_STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_STORAGE_FULL_WORDS = ('No space left on device', 'Disk quota exceeded')


class StorageFullError(OSError):
  """A write failed on a full disk or quota; the message says what and where."""


def storage_full(error: BaseException) -> str | None:
  """'No space left on device' (or the quota's words) if `error` or one of its
  causes is a full disk or quota; None otherwise."""
  for cause in _chain(error):
    if isinstance(cause, OSError) and cause.errno in _STORAGE_FULL_ERRNOS:
      return cause.strerror or os.strerror(cause.errno)
    for words in _STORAGE_FULL_WORDS:
      if words in str(cause):
        return words
  return None


def _chain(error: BaseException) -> Iterator[BaseException]:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _raised_in_et_flax(error: BaseException) -> bool:
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and frames[-1].filename.startswith(_PACKAGE_DIR)


def _message(error: BaseException) -> str:
  if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
    return error.args[0]
  return str(error) or type(error).__name__


def user_error_message(error: BaseException) -> str | None:
  """What to print for an error the user can fix; None for an internal error.

  User errors: what et_flax raises with a message for the user (ValueError,
  including a bad launch; a busy workdir; a NaN stop), and any OSError (a
  missing or unwritable file, a full disk), also one found among the causes
  of another error (as orbax raises them). A ValueError raised inside a
  library is an internal error; so is a oneDNN build failure
  (OneDNNUnavailableError), whose traceback says more.
  """
  mine = (ValueError, FloatingPointError, workdir_lock.WorkdirBusyError)
  if isinstance(error, mine) and _raised_in_et_flax(error):
    return _message(error)
  for cause in _chain(error):
    if isinstance(cause, OSError):
      return _message(cause)
    if any(words in str(cause) for words in _STORAGE_FULL_WORDS):
      return str(cause).strip().splitlines()[-1]
  return None


def _log_traceback(error: BaseException) -> None:
  """The traceback to the log file only (the console decides for itself)."""
  if _log is not None:
    _log.handle(_errors_logger.makeRecord(
        _errors_logger.name, logging.ERROR, __file__, 0, '%s: %s',
        (type(error).__name__, error), (type(error), error, error.__traceback__)))


def _exit_with(*lines: str, code: int = 1) -> None:
  sys.stderr.write(''.join(line + '\n' for line in lines))
  sys.stderr.flush()
  sys.exit(code)


def _override_of(field: str, argv: list[str]) -> str | None:
  """The --<config>.a.b=value argument that names `field`, if any."""
  for arg in argv[1:]:
    name = arg.split('=', 1)[0]
    if name.startswith('--') and '.' in name and field in name.split('.')[1:]:
      return arg
  return None


_EXPECTED = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}


def _flag_error(error: flags.Error, argv: list[str]) -> str:
  """absl's message for a flag it could not parse; for a config override
  (`--config.batch_size=abc`), what the field takes instead of Python's
  conversion error."""
  text = str(error)
  match = re.match(r'flag --(\w+)\.([\w.]+)=', text)
  if match:
    flag, path = match.group(1), match.group(2).split('.')
    parent = flags.FLAGS[flag].value if flag in flags.FLAGS else None
    for part in path[:-1]:
      parent = parent.get(part) if hasattr(parent, 'get_type') else None
    # The field's declared type: a placeholder's too, whose value is None.
    if hasattr(parent, 'get_type') and path[-1] in parent:
      kind, value = parent.get_type(path[-1]), _given_value(argv, match.group(0)[7:-1])
      if kind in _EXPECTED and value is not None:
        now = parent[path[-1]]
        return (f'error: --{flag}.{".".join(path)}={value}: {flag}.{".".join(path)} takes '
                f'{_EXPECTED[kind]}' + (f' (its value now: {now!r})' if now is not None
                                        else '') + f', not {value!r}')
  return f'error: {text}'


def _given_value(argv: list[str], name: str) -> str | None:
  """The value given to flag `name` on the command line (`--name=value`,
  `-name=value` or `--name value`), the last one if several."""
  value = None
  for i, arg in enumerate(argv[1:], start=1):
    for dashes in ('--', '-'):
      if arg.startswith(f'{dashes}{name}='):
        value = arg[len(dashes) + len(name) + 1:]
      elif arg == f'{dashes}{name}' and i + 1 < len(argv):
        value = argv[i + 1]
  return value


@contextlib.contextmanager
def unknown_config_fields(argv: Sequence[str]) -> Iterator[None]:
  """Within: an override in `argv` of a field the config lacks is one
  `error:` line, exit 1.

  ml_collections raises a KeyError or AttributeError for
  `--config.modle.width=2` as it reads the overrides: while absl parses the
  flags (as `run` does), or as a config flag with a default config
  (`config_flags.DEFINE_config_dict`) is defined. Any other is raised as it is.
  """
  try:
    yield
  except (KeyError, AttributeError) as error:
    inner = error
    while inner.args and isinstance(inner.args[0], BaseException):
      inner = inner.args[0]
    text = inner.args[0] if inner.args and isinstance(inner.args[0], str) else str(inner)
    field, _, hint = text.partition('\n')
    override = _override_of(field.strip('\'"'), list(argv))
    if override is None:
      raise
    _exit_with(f'error: {override}: the config has no field {field}.'
               + (f' {hint}' if hint else ''))


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config error on one line (no traceback)."""
  try:
    with unknown_config_fields(argv):
      remaining = flags.FLAGS(argv)
  except flags.Error as error:
    _exit_with(_flag_error(error, argv),
               'Pass --helpshort or --helpfull to see help on flags.')
  for name in flags.FLAGS:
    reason = _config_load_failure(flags.FLAGS[name])
    if reason is not None:
      given = next((arg for arg in argv[1:] if arg.startswith(f'--{name}=')), f'--{name}')
      _exit_with(f'error: cannot load {given}: {reason} (config paths are '
                 'relative to the current directory)')
  return remaining


def _config_load_failure(flag: flags.Flag) -> str | None:
  """Why the config file of a config flag failed to load; None if it loaded
  (or `flag` is another flag).

  ml_collections keeps such a failure until the config is used: then any
  attribute raises an OSError whose cause is the loading error (other
  values have the attribute, or not).
  """
  try:
    getattr(flag.value, 'keys', None)
  except OSError as error:
    return str(error.__cause__ or error).strip().splitlines()[-1].strip()
  return None


def _main_with_console(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
  values = flags.FLAGS
  workdir = values['workdir'].value if 'workdir' in values else None
  process_id = values['process_id'].value if 'process_id' in values else None
  setup_logging(workdir, values.verbose, process_id or 0)
  try:
    return main(argv)
  except app.UsageError:
    raise
  except KeyboardInterrupt as interrupt:
    # Ctrl-C outside the training loop's own handling (interrupts.py).
    _log_traceback(interrupt)
    _exit_with(str(interrupt) or 'Interrupted',
               code=getattr(interrupt, 'exit_code', 128 + signal.SIGINT))
  except Exception as error:  # pylint: disable=broad-except
    _log_traceback(error)
    message = user_error_message(error)
    if message is None:
      raise  # an internal error: its traceback, as always
    if _verbose:
      traceback.print_exception(error)
    where = log_path()
    _exit_with(f'error: {message}',
               *([] if _verbose else [f'(traceback in {where})' if where else
                                      '(--verbose shows the traceback)']))


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` for an et_flax command, with the console set up.

  Adds the --verbose flag; sets up logging (to the log of --workdir, if the
  command has that flag) before `main`; prints flag and config errors, and
  errors the user can fix (`user_error_message`), on one `error:` line
  without a traceback, and exits 1.
  """
  if 'verbose' not in flags.FLAGS:
    flags.DEFINE_bool('verbose', False, 'Also show library logs (absl, orbax, tfds, '
                      'TensorFlow...) and tracebacks on the console; they always go to '
                      f'the workdir\'s {LOG_FILE}.')
  app.run(functools.partial(_main_with_console, main), flags_parser=_parse_flags)


# ---------------------------------------------------------------------------
# Progress within an epoch.

def _in_notebook() -> bool:
  ipython = sys.modules.get('IPython')
  shell = ipython.get_ipython() if ipython is not None else None
  return shell is not None and 'IPKernelApp' in getattr(shell, 'config', {})


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}' if hours else f'{minutes}:{seconds:02d}'


@functools.cache
def _bar_class(notebook: bool) -> type:
  if notebook:
    from tqdm import notebook as tqdm_notebook  # pylint: disable=import-outside-toplevel
    base = tqdm_notebook.tqdm
  else:
    base = tqdm.tqdm

  class Bar(base):
    """tqdm with a `stats` field for bar_format (tqdm's way: format_dict)."""
    stats = ' ' * BAR_STATS_WIDTH

    @property
    def format_dict(self):
      values = super().format_dict
      # As wide as the terminal, up to a line that Keras's fit would print.
      if values.get('ncols'):
        values['ncols'] = min(values['ncols'], MAX_BAR_LINE)
      return {**values, 'stats': self.stats}

  return Bar


class EpochProgress:
  """Progress within one epoch: a live bar on a terminal, plain lines elsewhere.

  On a terminal a tqdm bar shows step/steps, ETA, images per second and the
  running training loss, and is erased by `close()` (the epoch line
  follows). In a notebook with ipywidgets, a notebook bar. Elsewhere (a log
  file, a pipe, CI) no bar characters: a line such as
  `epoch 3/40: step 120/420, ETA 1:35, 3184 img/s, loss 0.4321` at most every
  `interval` seconds, none in an epoch shorter than that.

    progress = console.EpochProgress(epoch, config.num_epochs, steps_per_epoch,
                                     config.batch_size)
    for each step:
      ...
      progress.update(step_in_epoch, loss=lambda: train_metrics.compute()['loss'])
    progress.close()

  Images per second and the ETA count from the first `update` on, so the
  first step's compilation does not skew them.

  Args:
    epoch, num_epochs: shown as 'epoch 3/40'.
    steps: steps in the epoch.
    batch_size: images per step (the global batch).
    initial_step: steps already done (an epoch resumed within).
    mode: 'bar', 'notebook', 'lines' or 'off'; None chooses from where
      `stream` goes.
    stream: default sys.stderr.
    interval: seconds between lines in 'lines' mode.
    clock: seconds, for tests.
  """

  def __init__(self, epoch: int, num_epochs: int, steps: int, batch_size: int, *,
               initial_step: int = 0, mode: str | None = None,
               stream: TextIO | None = None, interval: float = LINE_INTERVAL_SECONDS,
               clock: Callable[[], float] = time.monotonic):
    self.prefix = f'epoch {epoch}/{num_epochs}'
    self.steps, self.batch_size = steps, batch_size
    self.stream = sys.stderr if stream is None else stream
    self.interval, self.clock = interval, clock
    if mode is None:
      if _in_notebook() and importlib.util.find_spec('ipywidgets') is not None:
        mode = 'notebook'
      elif self.stream.isatty() and os.environ.get('TERM') != 'dumb':
        mode = 'bar'
      else:
        mode = 'lines'
    if mode not in ('bar', 'notebook', 'lines', 'off'):
      raise ValueError(f"mode must be 'bar', 'notebook', 'lines' or 'off', got {mode!r}")
    self.mode = mode
    self.step = initial_step
    self._first: tuple[int, float] | None = None  # (step, time) of the first update
    # Lines wait `interval` from the start; a bar shows its first statistics
    # at once.
    self._last_shown = clock() if mode == 'lines' else -float('inf')
    self._bar = None
    if mode in ('bar', 'notebook'):
      self._bar = _bar_class(mode == 'notebook')(
          total=steps, initial=initial_step, desc=self.prefix, leave=False,
          file=None if mode == 'notebook' else self.stream, dynamic_ncols=True,
          mininterval=0.2, bar_format='{desc} {n_fmt}/{total_fmt} [{bar}] {stats}')

  def stats(self, loss: Any = None) -> str:
    """'ETA 1:35, 3184 img/s, loss 0.4321', each part once it is known."""
    parts = []
    if self._first is not None and self.step > self._first[0]:
      seconds = self.clock() - self._first[1]
      steps_per_second = (self.step - self._first[0]) / max(seconds, 1e-9)
      parts.append(f'ETA {_duration((self.steps - self.step) / steps_per_second)}')
      parts.append(f'{steps_per_second * self.batch_size:.0f} img/s')
    if callable(loss):
      loss = loss()
    if loss is not None:
      parts.append(f'loss {float(loss):.4f}')
    return ', '.join(parts)

  def update(self, step: int, loss: Any = None) -> None:
    """`step` steps of the epoch are done; `loss`: the running training loss.

    `loss` may be a number, an array, or a function returning one: it is
    read (a device sync) only when shown, at most every 0.5 s on a bar and
    every `interval` seconds in lines.
    """
    now = self.clock()
    self.step = step
    if self._first is None:
      self._first = (step, now)
    if self.mode == 'lines':
      if now - self._last_shown >= self.interval and step < self.steps:
        self._last_shown = now
        self.stream.write(f'{self.prefix}: step {step}/{self.steps}, {self.stats(loss)}'
                          .rstrip(', ') + '\n')
        self.stream.flush()
    elif self._bar is not None:
      if now - self._last_shown >= BAR_STATS_INTERVAL_SECONDS or step >= self.steps:
        self._last_shown = now
        self._bar.stats = self.stats(loss).ljust(BAR_STATS_WIDTH)
      self._bar.update(step - self._bar.n)

  def close(self) -> None:
    """Erases the bar (the epoch line takes its place); idempotent."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> EpochProgress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
