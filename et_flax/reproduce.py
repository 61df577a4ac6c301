"""The whole report in one command: every experiment, resumable, beside the report.

  python -m et_flax.reproduce --workdir=runs/report \
      --config.data.data_dir=/path/to/tiny-imagenet-200 \
      [--only=wide_5,deep_5] [--future_work] [--pretrained] [--quick] [--evaluate=false]
      [--estimate] [--workers=N | --worker] [--seeds=N]

Runs each experiment config of the report (configs/<name>.py; the future-work
and pretrained ones with their flags) in <workdir>/<name>/, one after
another, and writes <workdir>/reproduction.md and .csv (our numbers beside
the report's, and its findings checked against our runs) and claims.png.
Any config field can be set for every run (`--config.data.data_dir=...`).
Run the same command again to go on: finished runs are skipped, an
interrupted one resumes exactly, failed ones are tried again. A run that
fails is recorded (<workdir>/status.json) and the others go on; Ctrl-C or
SIGTERM stops the sweep once the current run has saved. `--quick` runs every
config for 2 epochs on the embedded digits, offline, in minutes on a CPU;
`--estimate` trains nothing and prints each run's expected time here.
`--workers=N` shares the sweep between N worker processes here (each its
share of the GPUs or cores); `--worker` is one worker, for a scheduler to
start many of on shared storage (et_flax/sweep_workers.py). `--seeds=N`
trains each experiment with N seeds, each its own run (<workdir>/<name>/ for
the first, <workdir>/<name>_seed<k>/ for the k-th after it): the table gives
their mean and spread, and a finding whose difference is inside the spread
is "within noise".
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import pathlib
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import matplotlib.pyplot as plt
import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from et_flax import checkpoints
from et_flax import config_files
from et_flax import console
from et_flax import evaluate
from et_flax.report import findings
from et_flax import interrupts
from et_flax import settings as settings_lib
from et_flax import sweep_workers
from et_flax import train
from et_flax.cpu import host_memory

STATUS_FILE = 'status.json'
TABLE = 'reproduction'  # .md and .csv
FIGURE = 'claims.png'

# --quick: the embedded digits at the smallest size each model takes (VGG16
# and ResNet50 halve the image five times), all 10 digits where a config asks
# for more classes, a few epochs.
QUICK_EPOCHS = 2
QUICK_IMAGE_SIZE = {'et': 8, 'vgg16': 32, 'resnet50': 32}
QUICK_BATCH_SIZE = 32
DIGIT_CLASSES = 10

_logger = logging.getLogger(__name__)


def select_experiments(only: Sequence[str] = (), future_work: bool = False,
                       pretrained: bool = False) -> list[findings.Experiment]:
  """The experiments to run, in the report's order.

  `only` names them (any group); otherwise the report's, with the
  future-work and pretrained ones where asked for.
  """
  if only:
    unknown = sorted(set(only) - set(findings.BY_NAME))
    if unknown:
      raise ValueError(f'--only names no experiment: {", ".join(unknown)}; the '
                       f'experiments are {", ".join(findings.BY_NAME)}')
    return [e for e in findings.EXPERIMENTS if e.name in only]
  groups = {findings.REPORT} | ({findings.FUTURE_WORK} if future_work else set()) | (
      {findings.PRETRAINED} if pretrained else set())
  return [e for e in findings.EXPERIMENTS if e.group in groups]


def make_quick(config: ml_collections.ConfigDict) -> None:
  """Turns an experiment's config into its quick version (in place)."""
  config.data.name = 'digits'
  config.data.data_dir = os.path.join('~', '.cache', 'et_flax')
  config.data.tfds_dir = ''
  config.data.image_size = QUICK_IMAGE_SIZE[config.model.name]
  classes = config.data.classes
  if not isinstance(classes, int) or not 0 < classes < DIGIT_CLASSES:
    config.data.classes = 0
  config.batch_size = QUICK_BATCH_SIZE
  config.num_epochs = QUICK_EPOCHS


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    name: str) -> None:
  """Sets each dotted field of `overrides` (from --config.a.b=v) in `config`."""
  for key, value in overrides.items():
    *parents, field = key.split('.')
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or field not in node:
      raise ValueError(f'--config.{key}: configs/{name}.py has no field {key}')
    node[field] = value


def experiment_config(name: str, quick: bool = False,
                      overrides: Mapping[str, Any] | None = None
                      ) -> ml_collections.ConfigDict:
  """configs/<name>.py, made quick, then with `overrides` set."""
  config = config_files.load(name)
  if quick:
    make_quick(config)
  apply_overrides(config, overrides or {}, name)
  return config


@dataclasses.dataclass(frozen=True)
class SweepRun:
  """One run of the sweep: an experiment with one of its seeds."""
  experiment: findings.Experiment
  seed: int = 0  # the k-th seed: the config's seed plus k

  @property
  def name(self) -> str:
    """Its sub-workdir, its key in status.json and its claim: the
    experiment's name for seed 0, <name>_seed<k> for the others."""
    return findings.run_name(self.experiment.name, self.seed)


def sweep_runs(experiments: Sequence[findings.Experiment], seeds: int = 1
               ) -> list[SweepRun]:
  """Each experiment's run for each of `seeds`: every experiment's first seed,
  then every experiment's second, and so on (a sweep of one seed first)."""
  return [SweepRun(experiment, seed) for seed in range(seeds) for experiment in experiments]


def run_config(run: SweepRun, quick: bool = False,
               overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The experiment's config (experiment_config), its seed moved on by the
  run's: seed 0 keeps the config as it is, so a one-seed sweep's runs are
  its runs."""
  config = experiment_config(run.experiment.name, quick, overrides)
  if run.seed:
    config.seed += run.seed
  return config


def _fingerprint(config: ml_collections.ConfigDict) -> str:
  text = json.dumps(checkpoints.config_to_dict(config), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec='seconds')


class SweepStatus:
  """<workdir>/status.json: each run's status, message and config, kept atomically.

  Every change reads the file afresh and writes it under a short lock, so
  that the workers of a sweep keep one status between them.
  """

  def __init__(self, workdir: pathlib.Path, quick: bool):
    self.path = workdir / STATUS_FILE
    self._lock = workdir / sweep_workers.STATUS_LOCK
    with sweep_workers.locked(self._lock):
      saved = self._read()
      if saved is not None and saved.get('quick') != quick:
        raise ValueError(
            f'{workdir} holds a {"quick" if saved.get("quick") else "full"} sweep: '
            f'rerun {"with" if saved.get("quick") else "without"} --quick, or use '
            'another --workdir')
      self.data = saved or {'quick': quick, 'runs': {}}
      self._save()  # a sweep's root holds a run from its start: its log.txt opens

  def get(self, name: str) -> dict[str, Any]:
    self.data = self._read() or self.data
    return self.data['runs'].get(name, {})

  def set(self, name: str, **fields: Any) -> None:
    with sweep_workers.locked(self._lock):
      self.data = self._read() or self.data
      self.data['runs'].setdefault(name, {}).update(fields)
      self._save()

  def _read(self) -> dict[str, Any] | None:
    return json.loads(self.path.read_text()) if self.path.exists() else None

  def _save(self) -> None:
    tmp = self.path.with_suffix('.tmp')
    tmp.write_text(json.dumps(self.data, indent=1))
    os.replace(tmp, self.path)


@contextlib.contextmanager
def _stop_between_runs() -> Iterator[None]:
  """Ctrl-C or SIGTERM outside a run's training stops the sweep as training would.

  (Within a run, train.train_and_evaluate saves first and raises.)
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def stop(signum, frame):
    del frame
    raise interrupts.TrainingInterrupted(
        signum, f'Stopped by {signal.Signals(signum).name} between runs. Run the same '
        'command to go on.')

  previous = {signum: signal.signal(signum, stop) for signum in interrupts.SIGNALS}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


@dataclasses.dataclass
class SweepSummary:
  results: list[findings.RunResult]  # each seed's run
  claims: list[dict[str, str]]
  table: pathlib.Path  # the Markdown; the CSV beside it
  figure: pathlib.Path | None


def run_sweep(workdir: str | pathlib.Path, experiments: Sequence[findings.Experiment], *,
              quick: bool = False, overrides: Mapping[str, Any] | None = None,
              evaluate_runs: bool = True, log_each_run: bool = False,
              verbose: bool = False, longest_first: bool = False,
              seeds: int = 1) -> SweepSummary:
  """Runs `experiments` in <workdir>/<name>/, as one worker, and writes the table.

  Each run is claimed first (sweep_workers.Claim): runs that other workers
  (other processes on this sweep) hold are left to them, and a run one of
  them dropped (it died) is taken over; the worker ends when every run is
  done or failed. Runs go in the report's order, or with `longest_first`
  in decreasing order of their expected time. With `seeds` above 1, each
  experiment's run of each seed is a run of its own (`sweep_runs`).

  A run done with the same config is skipped; one stopped (killed or by a
  signal) resumes; a failure is recorded with its message and the sweep goes
  on. A signal stops the sweep after the current run saved
  (interrupts.TrainingInterrupted, which the table is written before); a
  full disk or quota stops it at once (console.StorageFullError, the run
  recorded as failed with its message where status.json can still be
  written). With
  `evaluate_runs` each finished run's best checkpoint is evaluated and its
  figures drawn (evaluate.evaluate_run); `log_each_run` gives each run its
  own log.txt, as et_flax.main would.
  """
  workdir = pathlib.Path(workdir)
  overrides = overrides or {}
  with sweep_workers.hold_sweep(workdir), _stop_between_runs():
    status = SweepStatus(workdir, quick)
    runs = sweep_runs(experiments, seeds)
    configs = _configs(runs, quick, overrides)
    order = list(runs)
    if longest_first:
      order = _longest_first(workdir, runs, configs, quick)
    try:
      _work(workdir, experiments, order, configs, status, quick, overrides,
            evaluate_runs, log_each_run, verbose, seeds)
    except console.StorageFullError:
      raise  # the table would not fit either: the sweep that goes on writes it
    except BaseException:  # stopped: the table shows where the sweep stands
      write_outputs(workdir, experiments, quick, seeds=seeds)
      raise
  return write_outputs(workdir, experiments, quick, seeds=seeds)


def _configs(runs: Sequence[SweepRun], quick: bool,
             overrides: Mapping[str, Any]) -> dict[str, ml_collections.ConfigDict | None]:
  """Each run's config; None for one that fails to build (its run records why)."""
  configs = {}
  for run in runs:
    try:
      configs[run.name] = run_config(run, quick, overrides)
    except Exception:  # pylint: disable=broad-except
      configs[run.name] = None
  return configs


def _longest_first(workdir: pathlib.Path, runs: Sequence[SweepRun],
                   configs: Mapping[str, ml_collections.ConfigDict | None],
                   quick: bool) -> list[SweepRun]:
  saved = None if quick else sweep_workers.load_estimate(workdir)
  if saved:  # measured once an experiment: each of its seeds' runs takes that long
    saved = {run.name: saved[run.experiment.name] for run in runs
             if run.experiment.name in saved}
  seconds = sweep_workers.expected_seconds(
      {name: config for name, config in configs.items() if config is not None}, saved, quick)
  if saved:
    console.info('Runs longest first, by the rates --estimate measured (%s)',
                 workdir / sweep_workers.ESTIMATE_FILE)
  else:
    console.info('Runs longest first, by epochs x images x model cost (%s)',
                 'quick mode' if quick else f'no {sweep_workers.ESTIMATE_FILE} here: '
                 '--estimate with this --workdir measures the rates')
  return sorted(runs, key=lambda run: -seconds.get(run.name, 0.0))


def _settled(saved: Mapping[str, Any], config: ml_collections.ConfigDict | None,
             since: float) -> bool:
  """Whether a run needs no worker: done with its config, or failed since `since`
  (a failure before is tried again, as a rerun does)."""
  if saved.get('status') == 'done':
    return config is not None and saved.get('fingerprint') == _fingerprint(config)
  return saved.get('status') == 'failed' and saved.get('failed_at', 0.0) >= since


def _work(workdir: pathlib.Path, experiments: Sequence[findings.Experiment],
          order: Sequence[SweepRun],
          configs: Mapping[str, ml_collections.ConfigDict | None], status: SweepStatus,
          quick: bool, overrides: Mapping[str, Any], evaluate_runs: bool,
          log_each_run: bool, verbose: bool, seeds: int) -> None:
  """Claims and runs the first unsettled run of `order`, until none is left."""
  since = time.time()
  counters = {run.name: f'[{i}/{len(order)}]' for i, run in enumerate(order, 1)}
  for run in order:
    if _settled(status.get(run.name), configs[run.name], since):
      console.info('%s %s: done, skipped (%s)', counters[run.name], run.name,
                   workdir / run.name)
  waiting = False
  while True:
    left = [run for run in order
            if not _settled(status.get(run.name), configs[run.name], since)]
    if not left:
      return
    for run in left:
      claim = sweep_workers.Claim(workdir, run.name)
      if not claim.try_acquire():
        continue
      with claim:
        waiting = False
        if not _settled(status.get(run.name), configs[run.name], since):
          _run_one(workdir, run, counters[run.name], status, quick,
                   overrides, evaluate_runs, log_each_run, verbose)
          write_outputs(workdir, experiments, quick, figure=False, seeds=seeds)
      break
    else:  # every run left is another worker's
      if not waiting:
        console.info('Waiting for the runs other workers hold (%s), to take over any '
                     'they drop', ', '.join(run.name for run in left))
        waiting = True
      time.sleep(sweep_workers.POLL_SECONDS)


def _run_one(workdir: pathlib.Path, run: SweepRun, counter: str,
             status: SweepStatus, quick: bool, overrides: Mapping[str, Any],
             evaluate_runs: bool, log_each_run: bool, verbose: bool) -> None:
  name, run_dir = run.name, workdir / run.name
  try:
    config = run_config(run, quick, overrides)
  except Exception as error:  # pylint: disable=broad-except
    _record_failure(status, name, counter, error)
    return
  fingerprint = _fingerprint(config)
  saved = status.get(name)
  if saved.get('status') == 'done' and saved.get('fingerprint') == fingerprint:
    console.info('%s %s: done, skipped (%s)', counter, name, run_dir)
    return
  if saved.get('status') in ('done', 'failed', 'running', 'interrupted'):
    verb = {'done': 'config changed, going on', 'failed': 'failed before, trying again'}.get(
        saved['status'], 'resuming')
  else:
    verb = 'starting'
  experiment = run.experiment.name
  console.info('%s %s: %s (configs/%s.py, %s%d epoch%s) in %s', counter, name, verb,
               experiment, f'seed {config.seed}, ' if run.seed else '', config.num_epochs,
               '' if config.num_epochs == 1 else 's', run_dir)
  status.set(name, status='running', message='', fingerprint=fingerprint, started=_now(),
             config=f'configs/{experiment}.py', workdir=str(run_dir),
             worker=sweep_workers.worker_label(), pid=os.getpid(), host=socket.gethostname(),
             **({'seed': config.seed} if run.seed else {}))
  if log_each_run:
    console.setup_logging(run_dir, verbose)
  try:
    console.info('%s', sweep_workers.describe_worker())
    train.train_and_evaluate(config, str(run_dir))
    if evaluate_runs:
      report = evaluate.evaluate_run(run_dir, 'best', 'val', figures=True)
      console.info('%s %s: best epoch %d, val top-1 %.4f, top-5 %.4f; figures in %s',
                   counter, name, report['epoch'], report['top1_accuracy'],
                   report['top5_accuracy'], run_dir)
  except KeyboardInterrupt as stopped:  # saved by the run: not a failure
    status.set(name, status='interrupted', message=str(stopped), stopped=_now())
    raise
  except Exception as error:  # pylint: disable=broad-except
    if console.storage_full(error):
      _stop_on_full_disk(status, name, error)
    _record_failure(status, name, counter, error)
  else:
    status.set(name, status='done', finished=_now())
  finally:
    if log_each_run:
      console.setup_logging(workdir, verbose)


def _record_failure(status: SweepStatus, name: str, counter: str,
                    error: Exception) -> None:
  message = console.user_error_message(error) or f'{type(error).__name__}: {error}'
  _logger.error('%s failed', name, exc_info=error)  # the traceback, to the log file
  status.set(name, status='failed', message=message, stopped=_now(),
             failed_at=time.time())
  console.warning('%s %s failed, going on: %s', counter, name, message)


def _stop_on_full_disk(status: SweepStatus, name: str, error: Exception) -> None:
  """Records a run stopped by a full disk or quota as failed, and stops the
  sweep (console.StorageFullError): the next runs would fail the same way."""
  message = console.user_error_message(error)
  _logger.error('%s failed', name, exc_info=error)  # the traceback, to the log file
  try:
    status.set(name, status='failed', message=message, stopped=_now())
    recorded = f'recorded in {status.path}'
  except OSError as status_error:
    if console.storage_full(status_error) is None:
      raise
    recorded = f'{status.path} could not record it either'
  raise console.StorageFullError(
      f'{name} failed: {message} ({recorded}). The sweep stops here: free space and '
      'run the same command to go on.') from error


def load_results(workdir: str | pathlib.Path, experiments: Sequence[findings.Experiment],
                 seeds: int = 1) -> list[findings.RunResult]:
  """Each experiment's run of each of `seeds` in the sweep `workdir`, as far
  as it got: an experiment's seeds one after another, in its order."""
  workdir = pathlib.Path(workdir)
  path = workdir / STATUS_FILE
  saved = json.loads(path.read_text())['runs'] if path.exists() else {}
  runs = [SweepRun(experiment, seed) for experiment in experiments for seed in range(seeds)]
  return [findings.run_result(workdir / run.name, run.experiment.name,
                              saved.get(run.name, {}).get('status', 'pending'),
                              saved.get(run.name, {}).get('message', ''), run.seed)
          for run in runs]


QUICK_NOTE = (
    '**Quick mode** (`--quick`): every config on the embedded digits ({sizes}; at most '
    'the 10 digits as classes), {epochs}. This shows that every experiment runs '
    'end to end; digits are not Tiny ImageNet, so there is no gap column and the '
    "findings below compare in kind only: they say nothing about the report's.")
NOTES = (
    'Top-1 and top-5: validation accuracy at the best epoch (the one checkpoints_best/ '
    "keeps); gap: ours minus the report's; s/epoch: median time of an epoch (training "
    "and validation), the first (compiling) left out; the report's were on its GTX 1080. "
    'Subsets of 2-20 classes are evenly spaced over the sorted wnids (the report does '
    'not name its classes), so those rows compare in kind. dropout_200 trains from '
    'scratch; the report warm-started it from the augmented 200-class run.')
SEEDS_NOTE = (
    '**{seeds} seeds** (`--seeds={seeds}`): each experiment trained {seeds} times, its '
    "config's seed plus 0 to {last} (`<run>/` is the first, `<run>_seed<k>/` the k-th "
    'after it). Each row is the mean over the seeds that finished (seeds: how many), '
    'top-1 and top-5 ± their standard deviation (ddof=1). A finding agrees or disagrees '
    'only where the numbers it compares differ by more than the sum of their standard '
    'deviations (their mean ± std ranges are apart), and is **within noise** otherwise.')


def write_outputs(workdir: str | pathlib.Path, experiments: Sequence[findings.Experiment],
                  quick: bool, figure: bool = True, seeds: int = 1) -> SweepSummary:
  """reproduction.md and .csv (and claims.png) in `workdir`, from the runs there
  (under a lock: the workers of a sweep write them in turn); with `seeds`
  above 1, from each experiment's runs of its seeds."""
  workdir = pathlib.Path(workdir)
  with sweep_workers.locked(workdir / sweep_workers.TABLE_LOCK):
    return _write_outputs(workdir, experiments, quick, figure, seeds)


def _write_outputs(workdir: pathlib.Path, experiments: Sequence[findings.Experiment],
                   quick: bool, figure: bool, seeds: int) -> SweepSummary:
  results = load_results(workdir, experiments, seeds)
  by_name = findings.by_experiment(results)
  rows = findings.table_rows(results, quick)
  claims = findings.check_claims(by_name)
  counts = {s: sum(r.status == s for r in results)
            for s in ('done', 'failed', 'running', 'interrupted', 'pending')}
  lines = ['# The report, reproduced', '',
           f'{workdir}, {_now()}: ' + ', '.join(f'{n} {s}' for s, n in counts.items() if n)
           + f' of {len(results)} runs.', '']
  if quick:
    trained = sorted({r.epochs for r in results if r.epochs}) or [QUICK_EPOCHS]
    epochs = '-'.join(map(str, sorted({trained[0], trained[-1]})))
    lines += [QUICK_NOTE.format(sizes='E.T. at 8x8, VGG16 and ResNet50 at 32x32',
                                epochs=f'{epochs} epoch{"" if epochs == "1" else "s"}'), '']
  lines += ['## Results', '', NOTES, '']
  if seeds > 1:
    lines += [SEEDS_NOTE.format(seeds=seeds, last=seeds - 1), '']
  lines.append(findings.table_markdown(rows))
  failed = [r for r in results if r.status == 'failed']
  if failed:
    lines += ['## Failed runs', '', *[f'- `{r.run}`: {r.message}' for r in failed], '']
  lines += ['## The report\'s findings', '', findings.verdict_counts(claims)
            + f' (of {len(claims)} findings whose runs are in this sweep).', '']
  if claims:
    lines.append(findings.claims_markdown(claims))
  figure_path = workdir / FIGURE if figure else None
  if figure_path is not None:
    title = 'Quick mode (digits): in kind only' if quick else ''
    plt.close(findings.claims_figure(by_name, figure_path, title))
  if figure_path is not None or (workdir / FIGURE).exists():
    lines += ['', f'![the report\'s comparisons, ours beside its]({FIGURE})', '']
  table = workdir / f'{TABLE}.md'
  table.write_text('\n'.join(lines))
  with table.with_suffix('.csv').open('w', newline='') as file:
    writer = csv.DictWriter(file, ['mode', *findings.table_columns(rows)])
    writer.writeheader()
    writer.writerows({'mode': 'quick' if quick else 'full', **row} for row in rows)
  return SweepSummary(results, claims, table, figure_path)


# Tiny ImageNet has 500 training and 50 validation images per class.
TRAIN_PER_CLASS, VAL_PER_CLASS = 500, 50


def estimate_runs(experiments: Sequence[findings.Experiment],
                  overrides: Mapping[str, Any] | None = None, steps: int = 3,
                  warmup: int = 1) -> list[dict[str, Any]]:
  """Each run's expected time on Tiny ImageNet, from its steps timed on this machine.

  Times the config's compiled train step (with its augmentation) and eval
  step on random images (et_flax.benchmark.steps.time_steps): an epoch is
  its full training batches and its validation images. Reads no data and
  trains nothing; compiling and checkpoints are not counted.
  """
  from et_flax import augment  # pylint: disable=import-outside-toplevel
  from et_flax.benchmark import steps as benchmark  # pylint: disable=import-outside-toplevel
  estimates = []
  for experiment in experiments:
    config = experiment_config(experiment.name, overrides=overrides)
    classes = config.data.classes
    num_classes = (len(classes) if isinstance(classes, (list, tuple)) else
                   int(classes or 200))
    timing = benchmark.time_steps(config, settings_lib.resolve(config), config.batch_size,
                                  config.data.image_size, num_classes, steps, warmup,
                                  augment.config_from(config.augment))
    train_steps = num_classes * TRAIN_PER_CLASS // config.batch_size
    epoch = (train_steps * timing['train_step_seconds']
             + num_classes * VAL_PER_CLASS / timing['eval_images_per_second'])
    estimates.append({'run': experiment.name, 'epochs': config.num_epochs,
                      'train_images_per_second': timing['train_images_per_second'],
                      'epoch_seconds': epoch, 'hours': epoch * config.num_epochs / 3600})
    console.info('%s: %.1f img/s training, %.0f s per epoch, %d epochs: %.1f h',
                 experiment.name, timing['train_images_per_second'], epoch,
                 config.num_epochs, estimates[-1]['hours'])
  return estimates


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.seeds < 1:
    _refuse(f'--seeds={FLAGS.seeds}: give the number of seeds to train each experiment '
            'with (1 or more)')
  _check_worker_flags()
  if FLAGS.workdir is None and not FLAGS.estimate:
    sys.exit('error: --workdir is required: the sweep runs in <workdir>/<config name>/ '
             '(only --estimate runs without one)')
  experiments = select_experiments(FLAGS.only, FLAGS.future_work, FLAGS.pretrained)
  environments = None
  if FLAGS.workers > 1:
    try:
      environments = sweep_workers.worker_environments(
          FLAGS.workers, gpus=sweep_workers.visible_gpus(),
          cores=sorted(os.sched_getaffinity(0)), workers_per_device=FLAGS.workers_per_device)
    except ValueError as error:
      _refuse(str(error))
    if not FLAGS.estimate:
      _launch(experiments, environments)  # before JAX or anything the workers set up
      return
    os.environ.update(environments[0])  # --estimate: the rates of one worker's share
  sweep_workers.take_cores()
  sweep_workers.stop_with_launcher()
  host_memory.configure(FLAGS.host_memory)  # before JAX's backends start
  settings_lib.configure_determinism(FLAGS.deterministic)
  overrides = config_flags.get_override_values(FLAGS['config'])
  if FLAGS.estimate:
    _estimate(experiments, overrides, environments, FLAGS.seeds)
    return
  try:
    summary = run_sweep(FLAGS.workdir, experiments, quick=FLAGS.quick, overrides=overrides,
                        evaluate_runs=FLAGS.evaluate, log_each_run=True,
                        verbose=FLAGS.verbose, longest_first=FLAGS.worker,
                        seeds=FLAGS.seeds)
  except interrupts.TrainingInterrupted as stopped:
    console.info('%s', stopped)
    sys.exit(stopped.exit_code)
  _finish(summary)


def _check_worker_flags() -> None:
  if FLAGS.workers < 1:
    _refuse(f'--workers={FLAGS.workers}: give the number of worker processes '
             '(1 or more)')
  if FLAGS.worker and FLAGS['workers'].present:
    _refuse('--worker is one worker (a scheduler starts it as many times as it '
             'likes) and --workers=N starts N of them here: give one or the other')
  if FLAGS.worker and FLAGS.estimate:
    _refuse('--estimate trains nothing: leave --worker out (--workers=N prints '
             'the expected time for N workers)')
  if FLAGS['workers_per_device'].present and FLAGS.workers == 1:
    _refuse('--workers_per_device shares each GPU between workers: give '
             '--workers=N as well')


def _refuse(message: str) -> None:
  """A bad command line: one `error:` line, exit 1 (also where a test runs the
  command in its own process, which prints no SystemExit message)."""
  sys.stderr.write(f'error: {message}\n')
  sys.exit(1)


def _estimate(experiments: Sequence[findings.Experiment], overrides: Mapping[str, Any],
              environments: Sequence[Mapping[str, str]] | None, seeds: int = 1) -> None:
  estimates = estimate_runs(experiments, overrides)
  # Each seed's run takes its experiment's time (the same steps).
  run_hours = [e['hours'] for e in estimates for _ in range(seeds)]
  hours = sum(run_hours)
  device = jax.devices()[0].device_kind
  # Under 100 h, the tenths the per-run lines show; whole hours above.
  console.info('The sweep: %s h (%.1f days) of training and validation on %s%s',
               _hours(hours), hours / 24, device,
               f', {seeds} seeds of each run' if seeds > 1 else '')
  if environments:
    wall = sweep_workers.schedule_seconds([h * 3600 for h in run_hours],
                                          len(environments)) / 3600
    share = ', '.join(f'{k}={v}' for k, v in environments[0].items()
                      if k != sweep_workers.WORKER_ENV)
    console.info('With %d workers, longest first: %s h (%.1f days), each run at the '
                 "rate it had on one worker's share (%s)", len(environments), _hours(wall),
                 wall / 24, share)
  if FLAGS.workdir is not None:
    path = pathlib.Path(FLAGS.workdir) / sweep_workers.ESTIMATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'device': device, 'measured': _now(), 'runs': estimates},
                               indent=1))
    console.info('Saved the rates in %s: workers on this --workdir take the longest '
                 'runs first', path)


def _hours(hours: float) -> str:
  return f'{hours:.1f}' if round(hours, 1) < 100 else f'{hours:.0f}'


def _launch(experiments: Sequence[findings.Experiment],
            environments: Sequence[Mapping[str, str]]) -> None:
  """`--workers=N`: N `--worker` processes share the sweep; then the table."""
  workdir = pathlib.Path(FLAGS.workdir)
  command = [sys.executable, '-m', 'et_flax.reproduce', *_worker_argv(_ARGV), '--worker']
  with sweep_workers.hold_sweep(workdir):
    SweepStatus(workdir, FLAGS.quick)  # the other mode is refused before any worker starts
    console.info('%d workers share the sweep in %s', len(environments), workdir)
    codes, stopped = sweep_workers.launch(command, environments)
  if stopped:
    console.info('Stopped by %s: the workers saved their runs. Run the same command to go '
                 'on.', signal.Signals(stopped).name)
    sys.exit(128 + stopped)
  ended = [f'worker {i} ' + (f'was killed by {signal.Signals(-code).name}' if code < 0 else
                             f'exited {code}')
           for i, code in enumerate(codes, 1) if code not in (0, 1)]
  if ended:
    console.warning('%s (its lines above)', '; '.join(ended))
  _finish(write_outputs(workdir, experiments, FLAGS.quick, seeds=FLAGS.seeds))


def _worker_argv(argv: Sequence[str]) -> list[str]:
  """The launcher's arguments for its workers: without --workers and
  --workers_per_device (and their values)."""
  kept, skip = [], False
  for arg in argv:
    if skip:
      skip = False
      continue
    name, equals, _ = arg.lstrip('-').partition('=')
    if arg.startswith('-') and name in ('workers', 'workers_per_device'):
      skip = not equals
      continue
    kept.append(arg)
  return kept


def _finish(summary: SweepSummary) -> None:
  console.info('Wrote %s, %s and %s: %d of %d runs done; findings: %s', summary.table,
               summary.table.with_suffix('.csv').name, FIGURE,
               sum(r.status == 'done' for r in summary.results), len(summary.results),
               findings.verdict_counts(summary.claims))
  failed = [r for r in summary.results if r.status == 'failed']
  if failed:
    sys.exit('error: ' + '; '.join(f'{r.run} failed: {r.message.splitlines()[0]}'
                                   for r in failed)
             + '. The other runs are in the table; rerun to try the failed ones again.')
  unfinished = [r.run for r in summary.results if r.status != 'done']
  if unfinished:
    sys.exit(f'error: {", ".join(unfinished)} not finished (a worker ended early). Run '
             'the same command to go on.')


_ARGV: list[str] = []  # the command line as given, for the workers of --workers


def define_flags() -> None:
  _ARGV[:] = sys.argv[1:]
  flags.DEFINE_string('workdir', None, 'The sweep: each run in <workdir>/<config name>/, '
                      'the table and status.json in it (required, except with --estimate).')
  # Overrides for every run, typed by configs/default.py. ml_collections reads
  # them from the command line as it defines the flag (a typo: one error line).
  if any(re.match(r'^--?config(=|$)', arg) for arg in sys.argv[1:]):
    sys.exit('error: et_flax.reproduce runs the experiment configs; set a field for '
             'every run with --config.a.b=value, not --config=FILE')
  with console.unknown_config_fields(sys.argv):
    config_flags.DEFINE_config_dict(
        'config', config_files.load('default'), 'Set a field for every run, e.g. '
        '--config.data.data_dir=/data/tiny-imagenet-200 (a field a config lacks fails '
        'that run).', lock_config=True)
  flags.DEFINE_list('only', [], 'Run only these experiments (config names), e.g. '
                    '--only=wide_5,deep_5.')
  flags.DEFINE_bool('future_work', False, "Also run the report's future-work configs.")
  flags.DEFINE_bool('pretrained', False, 'Also run VGG16 and ResNet50 from Keras ImageNet '
                    'weights (README: Keras interop says how to get them).')
  flags.DEFINE_bool('quick', False, f'Every config on the embedded digits, {QUICK_EPOCHS} '
                    'epochs: offline, minutes on a CPU.')
  flags.DEFINE_bool('estimate', False, 'Train nothing: time each run\'s steps here and '
                    'print its expected time on Tiny ImageNet, and the sweep\'s.')
  flags.DEFINE_bool('evaluate', True, "Evaluate each finished run's best checkpoint and "
                    'draw its figures (curves, confusion matrix, misclassified images).')
  flags.DEFINE_integer('workers', 1, 'Share the sweep between this many worker processes '
                       'here: one GPU each (or --workers_per_device to a GPU), or on a CPU '
                       'its share of the cores.')
  flags.DEFINE_integer('workers_per_device', 1, 'With --workers on GPUs: workers per GPU, '
                       "each with its share of the GPU's memory.")
  flags.DEFINE_integer('seeds', 1, 'Train each experiment with this many seeds (the '
                       "config's seed plus 0, 1, ...), each its own run: <workdir>/<name>/ "
                       'for the first, <workdir>/<name>_seed<k>/ for the others; the table '
                       'gives their mean and spread, and a finding inside the spread is '
                       '"within noise".')
  flags.DEFINE_bool('worker', False, 'One worker of the sweep: start it any number of '
                    'times on the same --workdir (a SLURM array, by hand on several '
                    'machines over shared storage); the workers share the runs, longest '
                    'first.')
  host_memory.define_flag()
  settings_lib.define_deterministic_flag()


if __name__ == '__main__':
  define_flags()
  console.run(main)
