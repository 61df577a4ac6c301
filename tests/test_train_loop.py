"""Resume, config refusal, warm start, NaN stop and multi-device steps."""

import fcntl
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import tiny_config
from et_flax import checkpoints
from et_flax import interrupts
from et_flax import optim
from et_flax import run_files
from et_flax import train
from et_flax import workdir_lock

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMING_FIELDS = {'epoch_seconds', 'train_images_per_second', 'input_wait_fraction'}


def _main_args(workdir, data_dir, num_epochs):
  return [sys.executable, '-m', 'et_flax.main', '--config=configs/quickstart.py',
          f'--workdir={workdir}', f'--config.num_epochs={num_epochs}',
          '--config.data.image_size=8', f'--config.data.data_dir={data_dir}',
          '--config.model.num_modules=1', '--config.batch_size=64',
          '--config.augment.preset=five', '--config.model.dropout_rate=0.2',
          '--config.optimizer.plateau.patience=1',
          '--config.optimizer.plateau.min_delta=0.3', '--config.max_to_keep=2']


def _final_state(workdir):
  manager = ocp.CheckpointManager(
      (pathlib.Path(workdir) / checkpoints.LATEST).absolute(),
      options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))['state']
  manager.close()
  return step, state


def _history(workdir):
  lines = (pathlib.Path(workdir) / checkpoints.HISTORY_FILE).read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
          for line in lines]


def _saves_in_progress(workdir):
  """Orbax writes a checkpoint under a temporary name and renames it when done."""
  return [path for folder in (checkpoints.LATEST, checkpoints.BEST)
          for path in (pathlib.Path(workdir) / folder).glob('*.orbax-checkpoint-tmp*')]


def _checkpoint_lock_is_free(workdir):
  """Whether no save holds the checkpoint lock (a save holds it until finalized)."""
  try:
    fd = os.open(pathlib.Path(workdir) / workdir_lock.CHECKPOINT_LOCK_FILE, os.O_RDONLY)
  except FileNotFoundError:
    return True
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  finally:
    os.close(fd)


# A safety net for each wait on a run (each ends at its event: a few seconds
# to a minute here).
HOLD_TIMEOUT = 300

# `python -m et_flax.main`, held where ET_FLAX_TEST_HOLD (JSON) says, so that
# a test signals or kills it exactly there on any machine:
#   {"at": "step", "count": k}  after this process's k-th training step;
#   {"at": "evaluate"}  as its first evaluation begins;
#   {"at": "save"}  once its first save has begun (asynchronous: the files
#     may still be being written);
#   {"at": "finalize", "min_epoch": e}  in Orbax's finalization of its first
#     latest checkpoint of an epoch >= e: written, but its temporary folder
#     not yet renamed.
# There it writes where it is ({"epoch": ..., "step": ...}) to the file
# ET_FLAX_TEST_REACHED and waits until a signal arrives, or for good. It
# changes no computation: a held run trains the same bits.
HELD_MAIN = textwrap.dedent('''
    import json, os, pathlib, sys, threading
    from et_flax import checkpoints, console, interrupts, main, train

    hold_at = json.loads(os.environ['ET_FLAX_TEST_HOLD'])
    reached = pathlib.Path(os.environ['ET_FLAX_TEST_REACHED'])
    now = {'epoch': None, 'steps': 0, 'held': False}
    signalled = threading.Event()

    def hold(position):
      if now['held']:
        return
      now['held'] = True
      partial = reached.with_name(reached.name + '.partial')
      partial.write_text(json.dumps(position))
      os.replace(partial, reached)  # whole when the test sees it
      signalled.wait()

    arrived = interrupts.StopRequests._arrived

    def counted(self, signum):  # in the thread that counts signals as they arrive
      arrived(self, signum)
      signalled.set()

    interrupts.StopRequests._arrived = counted

    run_train = train._Run._train

    def epoch_train(self, epoch, *args, **kwargs):
      now['epoch'] = epoch
      return run_train(self, epoch, *args, **kwargs)

    train._Run._train = epoch_train

    train_epoch = train.train_epoch

    def held_train_epoch(*args, steps_done=0, after_step=None, **kwargs):
      in_epoch = [steps_done]

      def after(state):
        if after_step is not None:
          after_step(state)
        in_epoch[0] += 1
        now['steps'] += 1
        if hold_at['at'] == 'step' and now['steps'] == hold_at['count']:
          hold({'epoch': now['epoch'], 'step': in_epoch[0]})

      return train_epoch(*args, steps_done=steps_done, after_step=after, **kwargs)

    train.train_epoch = held_train_epoch

    evaluate = train.evaluate

    def held_evaluate(*args, **kwargs):
      if hold_at['at'] == 'evaluate':
        hold({'epoch': now['epoch']})
      return evaluate(*args, **kwargs)

    train.evaluate = held_evaluate

    save = checkpoints.RunCheckpoints.save

    def held_save(self, epoch, *args, **kwargs):
      save(self, epoch, *args, **kwargs)
      if hold_at['at'] == 'save':
        hold({'epoch': epoch})

    checkpoints.RunCheckpoints.save = held_save

    item_handlers = checkpoints._item_handlers

    def held_item_handlers():
      handlers = item_handlers()
      finalize = handlers['state'].finalize

      def held_finalize(directory):  # in Orbax's thread that writes the checkpoint
        step = [p for p in pathlib.Path(str(directory)).parents
                if p.parent.name == checkpoints.LATEST]
        epoch = int(step[0].name.split('.')[0]) if step else None
        if hold_at['at'] == 'finalize' and epoch and epoch >= hold_at['min_epoch']:
          hold({'epoch': epoch})
        finalize(directory)

      handlers['state'].finalize = held_finalize
      return handlers

    checkpoints._item_handlers = held_item_handlers

    sys.argv[0] = 'et_flax.main'
    main.define_flags()
    console.run(main.main)
''')


def _start_held(args, env, hold, log):
  """Starts `args` (a `_main_args` command) held at `hold`: (process, where it holds).

  Returns once the run holds there.
  """
  reached = log.with_suffix('.reached')
  reached.unlink(missing_ok=True)  # an earlier run's
  env = {**env, 'ET_FLAX_TEST_HOLD': json.dumps(hold), 'ET_FLAX_TEST_REACHED': str(reached)}
  assert args[1:3] == ['-m', 'et_flax.main']
  with log.open('w') as log_file:
    process = subprocess.Popen([sys.executable, '-c', HELD_MAIN, *args[3:]], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=log_file)
  deadline = time.time() + HOLD_TIMEOUT
  while not reached.exists() and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  if not reached.exists():
    _kill(process)
    pytest.fail(f'the run never reached {hold}:\n{log.read_text()[-3000:]}')
  return process, json.loads(reached.read_text())


def _kill(process):
  if process.poll() is None:
    process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)


@pytest.mark.slow
def test_killed_and_restarted_run_equals_an_uninterrupted_one(digits_data_dir, tmp_path):
  """SIGKILL during a checkpoint save and within an epoch's steps, then resume.

  Each run is held where it is killed (HELD_MAIN), so the kills land there on
  any machine.
  """
  num_epochs = 6
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  reference = tmp_path / 'reference'
  subprocess.run(_main_args(reference, digits_data_dir, num_epochs), cwd=REPO, env=env,
                 check=True, capture_output=True, timeout=600)

  interrupted = tmp_path / 'interrupted'
  args = _main_args(interrupted, digits_data_dir, num_epochs)
  history_path = interrupted / checkpoints.HISTORY_FILE
  steps_per_epoch = 1347 // 64  # the digits' training split: 21
  rng = np.random.default_rng(0)

  def epochs_done():
    return len(history_path.read_text().splitlines()) if history_path.exists() else 0

  landed = []
  # During a save: in the finalization of the latest checkpoint of epoch 2 or
  # later (saved when val top-1 improves, and at the end), once its files
  # are written and before its temporary folder is renamed. The folder left
  # behind, and no final one, prove that the kill came during the save.
  process, held = _start_held(args, env, {'at': 'finalize', 'min_epoch': 2},
                              tmp_path / 'save.log')
  _kill(process)
  latest = interrupted / checkpoints.LATEST
  if (list(latest.glob(f'{held["epoch"]}.orbax-checkpoint-tmp*'))
      and not (latest / str(held['epoch'])).exists()):
    landed.append('save')
  # The run resumes from the checkpoint before, finalized.
  resumed_from = checkpoints.latest_meta(interrupted).epoch
  assert 1 <= resumed_from < held['epoch']

  # Within an epoch: after a random step of the second epoch the resumed run
  # trains, once the saves under way have been finalized (a save goes on
  # while the next epoch trains); the history must not have reached that
  # epoch then.
  count = int(rng.integers(steps_per_epoch + 1, 2 * steps_per_epoch))
  process, held = _start_held(args, env, {'at': 'step', 'count': count},
                              tmp_path / 'steps.log')
  try:
    deadline = time.time() + HOLD_TIMEOUT
    while time.time() < deadline and (_saves_in_progress(interrupted)
                                      or not _checkpoint_lock_is_free(interrupted)):
      time.sleep(0.02)
  finally:
    _kill(process)
  assert held == {'epoch': resumed_from + 2, 'step': count - steps_per_epoch}
  if epochs_done() == held['epoch'] - 1 and not _saves_in_progress(interrupted):
    landed.append('steps')
  assert landed == ['save', 'steps'], landed
  subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)

  step_a, state_a = _final_state(reference)
  step_b, state_b = _final_state(interrupted)
  assert step_a == step_b == num_epochs
  # Bit for bit on CPU: same batches, same keys, same XLA programs.
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  assert _history(reference) == _history(interrupted)
  assert [e['epoch'] for e in _history(interrupted)] == list(range(1, num_epochs + 1))
  # The plateau (patience 1) did act, and its state came through the restarts.
  rates = [e['learning_rate'] for e in _history(reference)]
  assert min(rates) < max(rates)


def test_a_kill_during_a_checkpoint_save_keeps_the_previous_one(tmp_path):
  script = textwrap.dedent(f'''
      import numpy as np
      from et_flax import checkpoints, run_files
      run = checkpoints.RunCheckpoints({str(tmp_path)!r})
      run.save(1, {{'w': np.ones(3)}}, run_files.RunMeta(epoch=1, config={{}}), best=False)
      print('saved 1', flush=True)
      big = {{f'w{{i}}': np.random.rand(4_000_000) for i in range(30)}}
      run.save(2, big, run_files.RunMeta(epoch=2, config={{}}), best=False)
      print('saved 2', flush=True)
  ''')
  process = subprocess.Popen([sys.executable, '-c', script], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == 'saved 1'
  folder = tmp_path / checkpoints.LATEST
  deadline = time.time() + 120
  while time.time() < deadline:
    if [p for p in folder.iterdir() if p.name.startswith('2')]:
      break
    time.sleep(0.005)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert [p for p in folder.iterdir() if p.name.startswith('2')], 'save 2 never began'
  run = checkpoints.RunCheckpoints(tmp_path)
  assert run.latest_epoch() == 1
  state, meta = run.restore(1, {'w': jax.ShapeDtypeStruct((3,), np.float64)})
  np.testing.assert_array_equal(state['w'], np.ones(3))
  assert meta == run_files.RunMeta(epoch=1, config={})


def test_changed_config_is_refused_unless_allowed(one_epoch_run, digits_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(one_epoch_run, workdir)  # one epoch of tiny_config
  history = (workdir / checkpoints.HISTORY_FILE).read_text()
  changed = tiny_config(digits_data_dir, num_epochs=2)
  changed.model.width = 2
  changed.optimizer.learning_rate = 3e-3
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(changed, str(workdir))
  assert 'model.width: 1 -> 2' in str(error.value)
  assert 'optimizer.learning_rate: 0.001 -> 0.003' in str(error.value)
  assert 'num_epochs' not in str(error.value)  # run length may change
  assert (workdir / checkpoints.HISTORY_FILE).read_text() == history
  # Run length alone is accepted, and the run continues.
  summary = train.train_and_evaluate(tiny_config(digits_data_dir, num_epochs=2),
                                     str(workdir))
  assert summary['epoch'] == 2
  allowed = tiny_config(digits_data_dir, num_epochs=3)
  allowed.optimizer.learning_rate = 3e-3
  assert train.train_and_evaluate(allowed, str(workdir),
                                  allow_config_change=True)['epoch'] == 3


def test_warm_start_loads_params_not_optimizer_state(one_epoch_run, digits_data_dir,
                                                    tmp_path):
  source = one_epoch_run  # one epoch of tiny_config, read only
  _, source_state = _final_state(source)
  target = tmp_path / 'target'
  config = tiny_config(digits_data_dir, num_epochs=1, init_from=str(source),
                        init_from_checkpoint='latest')
  config.optimizer.learning_rate = 1e-12  # the params barely move in this epoch
  config.augment.preset = 'none'
  train.train_and_evaluate(config, str(target))
  _, target_state = _final_state(target)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               source_state['params'], target_state['params'])
  # The optimizer started afresh: one epoch of Adam steps, not two.
  assert int(source_state['step']) == int(target_state['step'])
  assert int(target_state['opt_state']['direction']['count']) == int(target_state['step'])

  other = tiny_config(digits_data_dir, num_epochs=1, init_from=str(source))
  other.model.width = 2
  with pytest.raises(ValueError, match='does not fit this model: .*shapes differing'):
    train.train_and_evaluate(other, str(tmp_path / 'other'))
  assert not (tmp_path / 'other').exists()  # refused before anything was written
  with pytest.raises(FileNotFoundError, match='holds no best checkpoint'):
    train.train_and_evaluate(
        tiny_config(digits_data_dir, init_from=str(tmp_path / 'empty')),
        str(tmp_path / 'third'))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(one_epoch_run, digits_data_dir,
                                                           tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  shutil.copytree(one_epoch_run, workdir)  # one epoch of tiny_config
  good_step, good_state = _final_state(workdir)

  def nan_loss(logits, labels):
    return optim.categorical_crossentropy(logits, labels) * np.nan

  monkeypatch.setitem(optim.LOSSES, 'categorical_crossentropy', nan_loss)
  with pytest.raises(FloatingPointError, match='Training loss is nan in epoch 2'):
    train.train_and_evaluate(tiny_config(digits_data_dir, num_epochs=2), str(workdir))
  step, state = _final_state(workdir)
  assert step == good_step == 1
  jax.tree.map(np.testing.assert_array_equal, state, good_state)
  assert len(_history(workdir)) == 1


MULTI_DEVICE_SCRIPT = textwrap.dedent('''
    import functools, json
    import jax, jax.numpy as jnp, numpy as np
    from et_flax import distributed, models, optim, train
    assert jax.device_count() == 4, jax.devices()
    model = models.ETNet(num_classes=10, num_modules=1)
    # Plain SGD, not Adam: its update is in proportion to the gradient, so a
    # gradient summed over the 4 devices instead of averaged moves every
    # parameter 4x as far (Adam's normalised update would hide it but for eps).
    tx = optim.create_optimizer({'name': 'sgd', 'learning_rate': 0.1})
    state = train.create_train_state(jax.random.key(0), model, 8, tx)
    rng = np.random.default_rng(0)
    batches = [{'image': rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
                'label': rng.integers(0, 10, 16).astype(np.int32)} for _ in range(3)]
    step = functools.partial(train.train_step, loss_fn=optim.categorical_crossentropy)
    key = jax.random.key(1)

    single = state
    one_device = jax.jit(step)
    for b in batches:
      single, _ = one_device(jax.device_put(single, jax.devices()[0]),
                             jax.device_put(b, jax.devices()[0]), key)

    mesh = distributed.make_mesh()
    meshed = distributed.replicate(state, mesh)
    mesh_step = jax.jit(step)
    for b in batches:
      meshed, metrics = mesh_step(meshed, distributed.shard_batch(b, mesh), key)
    assert meshed.params['stem_conv']['kernel'].sharding.is_fully_replicated

    pmapped = jax.tree.map(lambda x: jnp.stack([x] * 4), state)
    pmap_step = jax.pmap(functools.partial(step, axis_name='batch'), axis_name='batch',
                         in_axes=(0, 0, None))
    for b in batches:
      pmapped, _ = pmap_step(pmapped, jax.tree.map(
          lambda x: x.reshape(4, -1, *x.shape[1:]), b), key)
    pmapped = jax.tree.map(lambda x: x[0], pmapped)

    def leaves(tree):
      return [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(tree))]

    def max_diff(a, b):
      # In units of how far the one-device run moved each array: a gradient
      # 4x too large shows as ~3 units, float32 rounding as ~1e-5.
      return max(float(np.max(np.abs(x - y)) / np.max(np.abs(x - s)))
                 for x, y, s in zip(leaves(a), leaves(b), leaves(state.params)))
    print(json.dumps({
        'mesh': max_diff(single.params, meshed.params),
        'pmap': max_diff(single.params, pmapped.params),
        # Each array's movement in units of its size (biases start at 0).
        'moved': min(float(np.max(np.abs(x - s)) / max(np.max(np.abs(s)), np.max(np.abs(x))))
                     for x, s in zip(leaves(single.params), leaves(state.params)))}))
''')


def test_four_devices_equal_one_through_mesh_and_pmap():
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'TF_CPP_MIN_LOG_LEVEL': '2'}
  result = subprocess.run([sys.executable, '-c', MULTI_DEVICE_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  diffs = json.loads(result.stdout.strip().splitlines()[-1])
  assert diffs['moved'] > 5e-4  # three SGD steps moved every array (measured 1.3e-3)
  # Same maths; only the order of the float32 sums over the batch differs
  # (per-device partial sums, then an all-reduce). Measured, in units of the
  # one-device run's movement: 2.6e-5 (mesh) and 1.1e-5 (pmap), the float32
  # rounding of parameters ~1e3 times their movement. Gradients summed over
  # the devices instead of averaged (psum for pmean in train_step): 3.4.
  for name in ('mesh', 'pmap'):
    assert diffs[name] < 1e-3, diffs


@pytest.mark.first
@pytest.mark.slow
def test_sigint_and_sigterm_save_and_resume_exactly(digits_data_dir, tmp_path):
  """Signals at random moments of steps, an evaluation and a save: each run
  stops at the first step boundary after the signal, loses no finished
  epoch, and the resumed run equals an uninterrupted one.

  Each run is held where it is signalled (HELD_MAIN), so the signals land
  there on any machine.
  """
  num_epochs = 8
  # Batches of 16: 84 steps an epoch, so that signals land within epochs too;
  # checkpoints only every 3 epochs, so that stopping must save on its own.
  args = _main_args(tmp_path / 'reference', digits_data_dir, num_epochs)
  args = [a for a in args if not a.startswith('--config.batch_size')] + [
      '--config.batch_size=16', '--config.checkpoint_every_epochs=3']
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  steps_per_epoch = 1347 // 16

  workdir = tmp_path / 'interrupted'
  args = [a.replace(str(tmp_path / 'reference'), str(workdir)) for a in args]
  history_path = workdir / checkpoints.HISTORY_FILE
  rng = np.random.default_rng(1)
  # Each run from where the last stopped: during its first save (epoch 1,
  # asynchronous: maybe still being written), after a random step of its
  # first epoch, as its first evaluation begins (of the epoch that run had
  # begun), after a random step of its second epoch.
  plan = [(signal.SIGINT, {'at': 'save'}),
          (signal.SIGTERM, {'at': 'step', 'count': int(rng.integers(1, steps_per_epoch))}),
          (signal.SIGINT, {'at': 'evaluate'}),
          (signal.SIGTERM, {'at': 'step', 'count': int(
              rng.integers(steps_per_epoch + 1, 2 * steps_per_epoch))})]
  stops = 0
  for i, (signum, hold) in enumerate(plan):
    log = tmp_path / f'run_{i}.log'
    process, held = _start_held(args, env, hold, log)
    try:
      finished = len(history_path.read_text().splitlines()) if history_path.exists() else 0
      process.send_signal(signum)
      code = process.wait(timeout=HOLD_TIMEOUT)
    finally:
      _kill(process)
    assert code == 128 + signum, log.read_text()[-3000:]
    # At the first step boundary after the signal: after the step it came in,
    # else before the next epoch's first step.
    if hold['at'] == 'step':
      where = f'after step {held["step"]} of epoch {held["epoch"]}'
    else:
      where = f'after step 0 of epoch {held["epoch"] + 1}'
    assert f'Stopped by {signal.Signals(signum).name} {where}:' in log.read_text(), (
        log.read_text()[-3000:])
    stops += 1
    meta = checkpoints.latest_meta(workdir)
    # No finished epoch lost: not one in the history then, nor one since.
    assert meta is not None and meta.epoch >= finished
    assert meta.epoch == len(history_path.read_text().splitlines())
    if hold['at'] == 'step':  # saved where it stood, not at the epoch's start
      interrupted = meta.interrupted
      assert interrupted is not None and (interrupted.epoch, interrupted.steps_done) == (
          held['epoch'], held['step']), interrupted
  assert stops >= 3
  subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  step_a, state_a = _final_state(tmp_path / 'reference')
  step_b, state_b = _final_state(workdir)
  assert step_a == step_b == num_epochs
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  assert _history(tmp_path / 'reference') == _history(workdir)
  assert not (workdir / checkpoints.INTERRUPTED).exists() or not list(
      (workdir / checkpoints.INTERRUPTED).iterdir())


def test_a_resumed_epoch_counts_its_time_before_the_stop(digits_data_dir, tmp_path,
                                                         monkeypatch):
  """Two stops in the first epoch (SIGTERM 2 s after a run's third step),
  then a run that finishes it: the epoch's seconds, rate and input wait
  include every part, as an uninterrupted epoch's would."""
  original = train.train_epoch
  resumed_seconds = []

  def stopped_after_three(*args, after_step=None, **kwargs):
    steps = []

    def after(state):
      if after_step is not None:
        after_step(state)
      steps.append(int(state.step))
      if len(steps) == 3:
        time.sleep(2.0)
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, after_step=after, **kwargs)

  def timed(*args, **kwargs):
    start = time.perf_counter()
    result = original(*args, **kwargs)
    resumed_seconds.append(time.perf_counter() - start)
    return result

  config = tiny_config(digits_data_dir, num_epochs=1)
  steps_per_epoch = 1347 // config.batch_size  # the digits' training split: 21
  parts = []
  monkeypatch.setattr(train, 'train_epoch', stopped_after_three)
  for _ in range(2):
    with pytest.raises(interrupts.TrainingInterrupted):
      train.train_and_evaluate(config, str(tmp_path))
    parts.append(checkpoints.latest_meta(tmp_path).interrupted)
  assert parts[0].steps_done < parts[1].steps_done < steps_per_epoch
  assert parts[0].seconds >= 2.0 and parts[1].seconds >= parts[0].seconds + 2.0
  assert 0 < parts[0].wait_seconds < parts[1].wait_seconds
  monkeypatch.setattr(train, 'train_epoch', timed)
  train.train_and_evaluate(config, str(tmp_path))
  (entry,) = map(json.loads, (tmp_path / checkpoints.HISTORY_FILE).read_text().splitlines())
  assert entry['epoch_seconds'] > parts[1].seconds + resumed_seconds[0]
  train_seconds = steps_per_epoch * config.batch_size / entry['train_images_per_second']
  assert train_seconds > parts[1].seconds + resumed_seconds[0]
  assert entry['input_wait_fraction'] * train_seconds > parts[1].wait_seconds
