"""Rough edges of a run: 'auto' without a compiler, a finished run, a shape
change on resume, the NaN stop's checkpoint, wnids on the command line, and
evaluate on a workdir it cannot write."""

import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from absl import flags
from ml_collections import config_flags

from helpers import tiny_config
from et_flax import checkpoints
from et_flax import console
from et_flax import evaluate
from et_flax import models
from et_flax import optim
from et_flax import settings
from et_flax import train
from et_flax.cpu import onednn
from et_flax.data import digits
from et_flax.data import input_pipeline

REPO = pathlib.Path(__file__).resolve().parent.parent
FALLBACK_WARNING = "conv_impl='auto' uses XLA's convolutions"


def _tiny_main(workdir, data_dir, *extra):
  return [sys.executable, '-m', 'et_flax.main', '--config=configs/quickstart.py',
          f'--workdir={workdir}', '--config.num_epochs=1', '--config.data.image_size=8',
          '--config.model.num_modules=1', '--config.batch_size=64',
          f'--config.data.data_dir={data_dir}', *extra]


@pytest.fixture
def fresh_availability():
  """`onednn.available` forgets its answer before and after the test."""
  onednn.available.cache_clear()
  yield
  onednn.available.cache_clear()


# ---------------------------------------------------------------------------
# 'auto' without a C++ compiler.

def test_auto_falls_back_to_xla_without_a_compiler(digits_data_dir, tmp_path, monkeypatch,
                                                    run_command):
  """The issue's acceptance: CXX=/nonexistent/g++ and an empty cache still train."""
  cache = tmp_path / 'cache'
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'CXX': '/nonexistent/g++',
         'ET_FLAX_CACHE': str(cache)}
  workdir = tmp_path / 'auto'
  result = subprocess.run(_tiny_main(workdir, digits_data_dir), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-3000:]
  warnings = [line for line in output.splitlines() if FALLBACK_WARNING in line]
  assert len(warnings) == 1, warnings
  assert "$CXX='/nonexistent/g++'" in warnings[0]
  assert 'apt-get install g++' in warnings[0] and 'docs/performance.md' in warnings[0]
  assert 'xla convolutions' in output  # the run's model line agrees
  saved = checkpoints.latest_meta(workdir).settings  # and so do its checkpoints
  assert saved['conv_impl'] == 'xla' and saved['compute_dtype'] == 'float32'
  history = (workdir / checkpoints.HISTORY_FILE).read_text().splitlines()
  assert [json.loads(line)['epoch'] for line in history] == [1]
  assert not list(cache.glob('*.so'))

  # Asked for by name, oneDNN still fails, with the reason (before any work:
  # the command runs in this process, as a fresh process would, nothing loaded).
  for name in ('CXX', 'ET_FLAX_CACHE'):
    monkeypatch.setenv(name, env[name])
  monkeypatch.setattr(onednn, '_loaded', None)
  with pytest.raises(onednn.OneDNNUnavailableError,
                     match=re.escape("no C++ compiler found to build the oneDNN convolution "
                                     "(looked for $CXX='/nonexistent/g++')")):
    run_command(*_tiny_main(tmp_path / 'explicit', digits_data_dir,
                            '--config.conv_impl=onednn')[2:])
  assert not (tmp_path / 'explicit' / checkpoints.HISTORY_FILE).exists()
  assert not list(cache.glob('*.so'))


def test_auto_is_resolved_once_per_process(monkeypatch, caplog, fresh_availability):
  from configs import default
  calls = []
  # One Linux x86-64 CPU device, where 'auto' asks for oneDNN, whatever this machine is.
  cpu = settings.Platform('cpu', onednn_platform=True)

  def failing_load():
    calls.append(1)
    raise onednn.OneDNNUnavailableError(
        'building the oneDNN convolution failed (exit 1):\n  g++ -O2 x.cc\n'
        'x.cc:1:1: error: out of cheese\n'
        "Set config.conv_impl='xla' to train without it.")

  monkeypatch.setattr(onednn, 'load', failing_load)
  config = default.get_config()
  with caplog.at_level(logging.WARNING):
    first = settings.resolve(config, cpu)
    model = settings.build_model(config, first, 10, 8)
    resolved = [first.conv_impl, first.micro_batch_size,
                'xla' if model.conv is models.Conv else 'onednn',
                settings.resolve(config, cpu).conv_impl]
  assert resolved == ['xla', 8, 'xla', 'xla']  # 8: XLA's part at 64x64 (oneDNN's is 4)
  assert len(calls) == 1  # the build is not retried
  warnings = [r.getMessage() for r in caplog.records if FALLBACK_WARNING in r.getMessage()]
  assert len(warnings) == 1 and '\n' not in warnings[0]
  assert 'failed (exit 1): x.cc:1:1: error: out of cheese' in warnings[0]
  assert onednn.available() == (False, str(onednn.OneDNNUnavailableError(
      'building the oneDNN convolution failed (exit 1):\n  g++ -O2 x.cc\n'
      'x.cc:1:1: error: out of cheese\n'
      "Set config.conv_impl='xla' to train without it.")))
  # An explicit setting is never changed: 'onednn' stays, and fails loudly.
  config.conv_impl = 'onednn'
  with pytest.raises(onednn.OneDNNUnavailableError, match='out of cheese'):
    settings.resolve(config, cpu)
  assert len(calls) == 2


# ---------------------------------------------------------------------------
# A finished run, a shape change, the NaN stop.

def test_a_finished_run_says_so_before_decoding(one_epoch_run, digits_data_dir, tmp_path,
                                                monkeypatch, caplog):
  trained = tmp_path / 'run'
  shutil.copytree(one_epoch_run, trained)
  history = (trained / checkpoints.HISTORY_FILE).read_text()
  saved = [json.loads(line) for line in history.splitlines()]

  def no_decoding(*args, **kwargs):
    raise AssertionError('a finished run decoded data')

  monkeypatch.setattr(input_pipeline, 'load_split', no_decoding)
  with caplog.at_level(logging.INFO):
    summary = train.train_and_evaluate(tiny_config(digits_data_dir, num_epochs=1),
                                       str(trained))
  assert summary == saved[-1]
  message = ' '.join(r.getMessage() for r in caplog.records if 'is complete' in r.getMessage())
  assert f'{trained} is complete: 1 epochs trained (config.num_epochs=1)' in message
  assert f'best val top-1 {saved[0]["val_top1_accuracy"]:.4f} at epoch 1' in message
  assert str(trained / checkpoints.LATEST) in message
  assert str(trained / checkpoints.BEST) in message
  assert 'rerun with a larger --config.num_epochs' in message
  assert (trained / checkpoints.HISTORY_FILE).read_text() == history


def test_a_shape_change_names_the_arrays_and_cannot_resume(one_epoch_run, digits_data_dir,
                                                           tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(one_epoch_run, workdir)
  history = (workdir / checkpoints.HISTORY_FILE).read_text()
  wider = tiny_config(digits_data_dir, num_epochs=2)
  wider.model.width = 2
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(wider, str(workdir), allow_config_change=True)
  message = str(error.value)
  assert message.startswith(f'{workdir / checkpoints.LATEST / "1"} does not fit this config')
  assert 'params/block0/conv0/kernel: (1, 1, 16, 16) -> (1, 1, 32, 32)' in message
  assert 'params/block1/conv2/bias: (16,) -> (32,)' in message
  # 15 params: 12 named, then a count; not Adam's copies of them.
  assert '  ... and 3 more' in message and 'stem_conv' not in message
  assert 'opt_state' not in message
  assert 'cannot resume, even with --allow_config_change' in message
  assert (workdir / checkpoints.HISTORY_FILE).read_text() == history


def test_an_optimizer_state_change_points_to_a_warm_start(tmp_path):
  import numpy as np
  saved = {'params': {'dense': {'kernel': np.zeros((3, 2))}}, 'step': np.int32(0),
           'opt_state': {'m': {'dense': {'kernel': np.zeros((3, 2))}}}}
  changed = {'params': {'dense': {'kernel': np.zeros((3, 2))}}, 'step': np.int32(0),
             'opt_state': {'trace': {'dense': {'kernel': np.zeros((3, 2))}}}}
  checkpoints.check_resumable_shapes(saved, saved, 'x', tmp_path)  # same shapes: fine
  with pytest.raises(ValueError) as error:
    checkpoints.check_resumable_shapes(saved, changed, 'ckpt/3', tmp_path)
  message = str(error.value)
  assert 'opt_state/m/dense/kernel: (3, 2) -> (absent)' in message
  assert 'opt_state/trace/dense/kernel: (absent) -> (3, 2)' in message
  assert f'--config.init_from={tmp_path}' in message


def test_a_nan_stop_names_the_checkpoint_that_exists(one_epoch_run, digits_data_dir,
                                                     tmp_path, monkeypatch):
  def nan_loss(logits, labels):
    return optim.categorical_crossentropy(logits, labels) * float('nan')

  monkeypatch.setitem(optim.LOSSES, 'categorical_crossentropy', nan_loss)
  fresh = tmp_path / 'fresh'
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(tiny_config(digits_data_dir, num_epochs=2), str(fresh))
  assert 'Training loss is nan in epoch 1' in str(error.value)
  assert 'No checkpoint of a finished epoch was written yet' in str(error.value)
  assert not list((fresh / checkpoints.LATEST).glob('[0-9]*'))

  resumed = tmp_path / 'resumed'
  shutil.copytree(one_epoch_run, resumed)
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(tiny_config(digits_data_dir, num_epochs=2), str(resumed))
  assert 'Training loss is nan in epoch 2' in str(error.value)
  assert (f'The last good checkpoint, of epoch 1, stays in '
          f'{resumed / checkpoints.LATEST / "1"}') in str(error.value)
  assert (resumed / checkpoints.LATEST / '1').is_dir()


def test_a_nan_stop_after_a_failed_save_says_both(digits_data_dir, tmp_path, monkeypatch):
  """The save under way when the loss turns non-finite has failed (a full
  disk): the stop names the loss, the failure and the checkpoint that is
  complete, where the save's error alone used to replace it."""
  def nan_loss(logits, labels):
    return optim.categorical_crossentropy(logits, labels) * float('nan')

  def failed_save(self):
    raise console.StorageFullError(
        f'No space left on device while writing the checkpoint of epoch 1 in {tmp_path}')

  monkeypatch.setitem(optim.LOSSES, 'categorical_crossentropy', nan_loss)
  monkeypatch.setattr(checkpoints.RunCheckpoints, 'latest_epoch', failed_save)
  # A full disk: the error of one (a sweep stops on it), with both said.
  with pytest.raises(console.StorageFullError) as error:
    train.train_and_evaluate(tiny_config(digits_data_dir, num_epochs=1), str(tmp_path / 'run'))
  message = str(error.value)
  assert message.startswith('Training loss is nan in epoch 1: stopping. The checkpoint save '
                            'before it failed too: No space left on device while writing')
  assert 'No checkpoint of a finished epoch was written yet' in message
  assert message.endswith('Free space (or raise the quota) before running it again.')
  assert console.user_error_message(error.value) == message  # one line, no traceback

  def unwritable(self):
    raise PermissionError(13, 'Permission denied', str(tmp_path / 'run2'))

  monkeypatch.setattr(checkpoints.RunCheckpoints, 'latest_epoch', unwritable)
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(tiny_config(digits_data_dir, num_epochs=1), str(tmp_path / 'run2'))
  assert str(error.value).startswith('Training loss is nan in epoch 1: stopping. The checkpoint '
                                     'save before it failed too: [Errno 13] Permission denied')


# ---------------------------------------------------------------------------
# data.classes from the command line.

def _parsed_classes(argument):
  """config.data.classes as ml_collections delivers `--config.data.classes=...`."""
  argv = ['prog', f'--config={REPO / "configs" / "quickstart.py"}',
          f'--config.data.classes={argument}']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config.data.classes


def test_classes_from_the_command_line(digits_data_dir):
  wnids = tuple(digits.wnid(d) for d in range(10))
  three, seven = digits.wnid(3), digits.wnid(7)
  assert _parsed_classes(f'{seven},{three}') == f'{seven},{three}'
  assert _parsed_classes(three) == three
  assert _parsed_classes('5') == 5
  assert _parsed_classes(f"['{seven}', '{three}']") == [seven, three]
  assert input_pipeline.select_classes(wnids, f'{seven},{three}') == (three, seven)
  assert input_pipeline.select_classes(wnids, f' {seven} , {three} ') == (three, seven)
  assert input_pipeline.select_classes(wnids, three) == (three,)
  assert input_pipeline.select_classes(wnids, '5') == input_pipeline.select_classes(wnids, 5)
  assert input_pipeline.select_classes(wnids, '0') == wnids
  with pytest.raises(ValueError, match=r"wnids the dataset does not have: \['n99'\]"):
    input_pipeline.select_classes(wnids, f'{three},n99')
  with pytest.raises(ValueError, match='distinct wnids'):
    input_pipeline.select_classes(wnids, f'{three},{three}')
  with pytest.raises(ValueError, match='distinct wnids'):
    input_pipeline.select_classes(wnids, ',')
  config = tiny_config(digits_data_dir)
  config.data.classes = _parsed_classes(f'{seven},{three}')
  info = input_pipeline.get_dataset_info(config.data)
  assert info.wnids == (three, seven) and info.num_classes == 2


# ---------------------------------------------------------------------------
# evaluate on a workdir it cannot write.

READ_ONLY_EVALUATE = textwrap.dedent('''
    import os, pathlib, runpy, sys
    workdir = pathlib.Path(sys.argv[1])
    if os.geteuid() == 0:  # root writes anywhere: fail the writes as a read-only mount would
      write_text = pathlib.Path.write_text
      def refuse(self, *args, **kwargs):
        if self.parent == workdir:
          raise PermissionError(13, 'Permission denied', str(self))
        return write_text(self, *args, **kwargs)
      pathlib.Path.write_text = refuse
    else:
      workdir.chmod(0o555)
    sys.argv = ['evaluate', f'--workdir={workdir}', '--checkpoint=latest', '--figures=false']
    runpy.run_module('et_flax.evaluate', run_name='__main__')
''')


def test_evaluate_prints_then_names_the_file_it_cannot_write(one_epoch_run, tmp_path):
  workdir = tmp_path / 'read_only'
  shutil.copytree(one_epoch_run, workdir)
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  try:
    result = subprocess.run([sys.executable, '-c', READ_ONLY_EVALUATE, str(workdir)],
                            cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
  finally:
    workdir.chmod(0o755)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'latest checkpoint (epoch 1)' in result.stdout and 'top-1 ' in result.stdout
  error_lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert error_lines == [f'error: cannot write {workdir / "eval_val_latest.json"}: '
                         'Permission denied; the metrics were computed but not saved '
                         '(make the workdir writable, or evaluate a copy of it)']
  assert 'Traceback' not in result.stderr
  assert not (workdir / 'eval_val_latest.json').exists()


def test_evaluate_run_keeps_the_report_when_a_figure_cannot_be_written(
    one_epoch_run, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / 'run'
  shutil.copytree(one_epoch_run, workdir)

  def refuse(history, path):
    raise PermissionError(13, 'Permission denied', str(path))

  monkeypatch.setattr(evaluate.analysis, 'training_curves', refuse)
  with pytest.raises(evaluate.ReportNotWrittenError) as error:
    evaluate.evaluate_run(workdir, 'latest', show_summary=True)
  assert str(error.value) == (f'cannot write {workdir / "curves.png"}: Permission denied; '
                              'eval_val_latest.json was written, the figures were not')
  assert error.value.report['top1_accuracy'] == json.loads(
      (workdir / 'eval_val_latest.json').read_text())['top1_accuracy']
  assert f'top-1 {error.value.report["top1_accuracy"]:.4f}' in capsys.readouterr().out
