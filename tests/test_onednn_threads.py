"""The oneDNN calls' threads: a fixed count, or following the load on the cores."""

import itertools
import logging
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import tiny_config
from et_flax import settings
from et_flax.cpu import onednn

pytestmark = pytest.mark.skipif(not onednn.platform_supported(),
                                reason='the oneDNN wheels are Linux x86-64 only')


@pytest.mark.parametrize('free, cores, threads', [
    (2.0, 2, 2), (1.8, 2, 2), (1.7, 2, 1), (1.0, 2, 1), (0.1, 2, 1), (0.0, 2, 1),
    (7.8, 8, 8), (3.2, 8, 3), (9.0, 8, 8),
])
def test_threads_for_the_free_cores(free, cores, threads):
  assert onednn.threads_for(free, cores) == threads


def test_others_is_the_cores_busy_time_less_this_process_per_second():
  # 3 busy core-seconds over 2 s, of which this process used 1: 1 core.
  assert onednn._others((100.0, 5.0, 10.0), (103.0, 6.0, 12.0)) == pytest.approx(1.0)
  # This process's time can exceed the clock ticks' rounding: never below 0.
  assert onednn._others((100.0, 5.0, 10.0), (100.0, 5.5, 11.0)) == 0.0


def test_a_busy_process_on_a_core_is_counted_there():
  # A busy loop pinned to core 0 keeps it busy, whatever else runs there;
  # this process sleeps meanwhile. Only core 0's time is counted (not the
  # other cores'), in seconds per second (not clock ticks).
  core = min(os.sched_getaffinity(0))
  busy = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
  try:
    os.sched_setaffinity(busy.pid, {core})
    time.sleep(0.3)  # started and running
    others = onednn.cores_used_by_others(1.0, frozenset({core}))
  finally:
    busy.kill()
    busy.wait(timeout=10)
  assert 0.8 <= others <= 1.05


class FakeCalls:
  """The calls as `kind_stats` gives them: one kind, each count of threads
  running `rates[threads]` calls a second."""

  def __init__(self, rates):
    self.rates, self.threads, self.calls, self.seconds = rates, 0, 0, 0.0
    self.set = []

  def set_threads(self, threads):
    self.set.append(threads)
    self.threads = threads

  def stats(self):
    self.seconds += 1.0
    self.calls += self.rates[self.threads]
    return {7: (self.calls, self.seconds, 0)}


def _follow(monkeypatch, others, rates, until):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
  monkeypatch.setattr(onednn, '_sample', lambda cores: (0.0, 0.0, 0.0))
  others = itertools.chain(others, itertools.repeat(others[-1]))
  monkeypatch.setattr(onednn, '_others', lambda before, after: next(others))
  calls = FakeCalls(rates)
  follower = onednn.LoadFollower(interval=0.001, set_threads=calls.set_threads,
                                     stats=calls.stats, probe=0.001, hold=3600).start()
  deadline = time.monotonic() + 30
  while not until(calls) and time.monotonic() < deadline:
    time.sleep(0.01)
  follower.stop()
  return calls, follower


def test_beside_a_busy_core_the_follower_keeps_the_faster_count_and_says_so_once(
    monkeypatch, caplog):
  # A busy loop: the calls run faster on two threads per core, which take a
  # larger share of the cores.
  caplog.set_level(logging.DEBUG)
  calls, follower = _follow(monkeypatch, [1.0], {2: 2.0, 4: 3.0},
                            until=lambda calls: len(calls.set) >= 6)
  # One thread per core at the start; the counts timed A-B-B-A, then the
  # count in use until the choice; then 4, held (no new probe for `hold`
  # seconds while the same core stays busy).
  assert calls.set[:6] == [2, 2, 4, 2, 2, 4]
  assert follower.threads == 4
  said = [r for r in caplog.records if 'oneDNN convolutions on' in r.getMessage()]
  assert [r.levelno for r in said] == [logging.INFO]
  assert said[0].getMessage().startswith(
      'oneDNN convolutions on 4 threads for 2 cores: other processes keep 1.0 cores busy, '
      'and the calls ran 1.50x faster on 4 threads than on 2')


def test_beside_a_process_that_waits_the_follower_keeps_every_core(monkeypatch, caplog):
  # The calls run faster on one thread per core.
  caplog.set_level(logging.DEBUG)
  calls, follower = _follow(monkeypatch, [1.0], {2: 3.0, 4: 2.0},
                            until=lambda calls: len(calls.set) >= 5)
  assert calls.set[:5] == [2, 2, 4, 2, 2]
  assert follower.threads == 2
  assert not [r for r in caplog.records if 'oneDNN convolutions on' in r.getMessage()]


def test_when_the_cores_are_free_again_the_follower_takes_them_all(monkeypatch):
  calls, follower = _follow(monkeypatch, [1.0, 1.0, 0.0], {2: 2.0, 4: 3.0},
                            until=lambda calls: len(calls.set) >= 7)
  assert calls.set[:7] == [2, 2, 4, 2, 2, 4, 2]
  assert follower.threads == 2


def test_jit_the_calls_are_counted_per_kind_leaving_out_the_first():
  def call(batch, channels):
    x = jax.numpy.ones((batch, 8, 8, 3), jax.numpy.float32)
    kernel = jax.numpy.ones((3, 3, 3, channels), jax.numpy.float32)
    jax.block_until_ready(onednn.conv_layer(x, kernel, jax.numpy.zeros(channels)))

  def new_kinds(before):  # the kinds called since `before`
    return {kind: counts for kind, counts in onednn._delta(onednn.kind_stats(), before).items()
            if any(counts)}

  before = onednn.kind_stats()  # with the kinds of the tests before in this process
  call(3, 17)  # a kind no other test runs: its first call builds its primitive
  (kind, built), = new_kinds(before).items()
  assert built == (0, 0.0, 1)
  call(3, 17)
  call(3, 17)
  (kind, (calls, seconds, builds)), = new_kinds(before).items()
  assert calls == 2 and seconds > 0 and builds == 1
  call(3, 19)
  call(3, 19)  # another kind
  assert len(new_kinds(before)) == 2 and new_kinds(before)[kind] == (calls, seconds, 1)


def test_the_speedup_compares_the_windows_kind_by_kind():
  # Kind 1 takes 1 s a call on A and 0.5 s on B; kind 2 takes 0.1 s and
  # 0.1 s. A ran mostly kind 2, B mostly kind 1: over all their calls, B's
  # seconds per call are the larger (0.46 against 0.14), yet B is faster.
  a = {1: (1, 1.0, 0), 2: (9, 0.9, 0), 3: (5, 5.0, 0)}  # kind 3 only in A: left out
  b = {1: (9, 4.5, 0), 2: (1, 0.1, 0)}
  # Both windows' calls: 10 of kind 1, 10 of kind 2; at A's times 10 + 1 s,
  # at B's 5 + 1 s.
  assert onednn.speedup(a, b) == pytest.approx(11 / 6)
  assert onednn.speedup(b, a) == pytest.approx(6 / 11)
  assert onednn.speedup(a, {3: (0, 0.0, 1), 4: (2, 1.0, 0)}) is None
  assert onednn.speedup({}, {}) is None


class Windows:
  """The calls as `kind_stats` gives them to a probe, which reads them at
  each window's start and end: at the end of window w (1, 2, ...) on
  `threads`, `window(w, threads)` gives its (calls, seconds, builds) of one
  kind."""

  def __init__(self, window):
    self.window, self.threads, self.reads, self.total = window, 2, 0, (0, 0.0, 0)

  def set_threads(self, threads):
    self.threads = threads

  def stats(self):
    self.reads += 1
    if self.reads % 2 == 0:  # a window's end
      added = self.window(self.reads // 2, self.threads)
      self.total = tuple(t + a for t, a in zip(self.total, added))
    return {7: self.total}


@pytest.mark.parametrize('faster', [1.0, 1.5])
def test_a_load_that_grows_during_the_probe_weighs_on_both_counts_alike(monkeypatch, faster):
  # Each window holds one call, whose time grows by 1 s a window (a load
  # building up); on 4 threads the calls are `faster`. Timed A-B-B-A, the
  # growth cancels: A's calls took 1 and 3 s, B's 2 s / `faster`. Timed A
  # then B, 4 threads would seem half as fast on an even load.
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
  calls = Windows(lambda w, threads: (1, w / (faster if threads == 4 else 1.0), 0))
  follower = onednn.LoadFollower(set_threads=calls.set_threads, stats=calls.stats, probe=0.001)
  assert follower._speedup(2, 4) == pytest.approx(faster)


@pytest.mark.parametrize('window', [1, 2, 3])
def test_a_probe_while_primitives_are_built_is_not_counted(monkeypatch, window):
  # A model starting: its first calls build primitives, and its first step
  # runs slow throughout (here, on 4 threads 4x faster than on 2, but a
  # build in any of the A-B-B-A windows voids the probe).
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
  builds = {window}
  calls = Windows(lambda w, threads: (4 if threads == 4 else 1, 1.0, int(w in builds)))
  follower = onednn.LoadFollower(set_threads=calls.set_threads, stats=calls.stats, probe=0.001)
  assert follower._speedup(2, 4) is None
  builds.clear()
  assert follower._speedup(2, 4) == pytest.approx(4.0)


@pytest.mark.parametrize('value, expected', [
    ('auto', onednn.FOLLOW_LOAD), (1, 1), ('3', 3)])
def test_the_setting(value, expected, digits_data_dir):
  # 'auto' follows the load: the calls give the same bits on any count.
  config = tiny_config(digits_data_dir, conv_impl='xla', onednn_threads=value)
  resolved = settings.resolve(config)
  assert resolved.onednn_threads == expected
  assert resolved.deterministic


@pytest.mark.parametrize('value', [0, -1, 'many', True, 1.5])
def test_a_bad_setting_is_refused(value, digits_data_dir):
  config = tiny_config(digits_data_dir, conv_impl='xla', onednn_threads=value)
  with pytest.raises(ValueError, match="config.onednn_threads must be 'auto' or a number "
                     f'of threads >= 1, got {value!r}'):
    settings.resolve(config)


@pytest.mark.parametrize('batch, side, channels', [(1, 8, 16), (4, 8, 16), (19, 8, 16),
                                                  (19, 2, 64)])
def test_jit_the_calls_give_the_same_bits_on_any_number_of_threads(batch, side, channels):
  # Each call is split along the batch into pieces set by the batch, the
  # geometry and the cores at start (19 images: pieces of two sizes; a 2x2
  # map under a 64-channel kernel: fewer backward pieces than forward ones)
  # and the weight and bias gradients summed over the pieces in their order,
  # so the same layer on 1, 2, 3 and 4 threads, one after the other, gives the
  # same bits; and the values are XLA's convolution's.
  rng = np.random.default_rng(batch)
  shape = (batch, side, side, channels)
  x = jax.numpy.asarray(rng.normal(size=shape), jax.numpy.float32)
  kernel = jax.numpy.asarray(rng.normal(size=(3, 3, channels, channels)) * 0.1,
                             jax.numpy.float32)
  bias = jax.numpy.asarray(rng.normal(size=channels) * 0.1, jax.numpy.float32)
  shortcut = jax.numpy.asarray(rng.normal(size=shape), jax.numpy.float32)

  def loss(x, kernel, shortcut, conv):
    return jax.numpy.sum(conv(x, kernel, shortcut) ** 2)

  def ours(x, kernel, shortcut):
    return onednn.conv_layer(x, kernel, bias, shortcut=shortcut, activation='relu')

  def xla(x, kernel, shortcut):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     precision=jax.lax.Precision.HIGHEST)
    return jax.nn.relu(y + bias + shortcut)

  grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  results = []
  for threads in (1, 2, 3, 4, 1):
    onednn.use_threads(threads)
    results.append(jax.block_until_ready(grads(x, kernel, shortcut, ours)))
    assert onednn.set_threads(threads) == threads  # the last call's threads
  onednn.use_threads(onednn.ALL_CORES)  # back to the suite's setting
  for other in results[1:]:
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other)):
      np.testing.assert_array_equal(a, b)
  # float32 sums in another order: a relative error of a few 1e-6 per term.
  reference = grads(x, kernel, shortcut, xla)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))


def test_the_benchmark_load_runs_while_the_block_runs_and_is_stopped():
  from et_flax.benchmark import load
  assert load.parse('busy:2') == ('busy', 2)
  for bad in ('busy:0', 'busy', 'gpu', 'busy:x'):
    with pytest.raises(ValueError, match=f"--load must be 'none', 'busy:N' .*got '{bad}'"):
      load.parse(bad)
  core = min(os.sched_getaffinity(0))
  with load.running('busy:1'):
    children = subprocess.run(['pgrep', '-P', str(os.getpid())], capture_output=True,
                              text=True, check=False).stdout.split()
    assert len(children) == 1
    os.sched_setaffinity(int(children[0]), {core})
    assert onednn.cores_used_by_others(0.5, frozenset({core})) >= 0.8
  assert not pathlib.Path(f'/proc/{children[0]}').exists()  # killed and reaped


def test_the_follower_never_loads_the_library_from_its_thread(monkeypatch):
  # It binds the library's functions when it starts: a later `load` that
  # fails (a test's stand-in, a process tearing down) cannot reach its thread.
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
  monkeypatch.setattr(onednn, '_sample', lambda cores: (0.0, 0.0, 0.0))
  monkeypatch.setattr(onednn, '_others', lambda before, after: 1.0)
  follower = onednn.LoadFollower(interval=0.001, probe=0.001, hold=0.0).start()
  loads = []
  monkeypatch.setattr(onednn, 'load', lambda: loads.append(1) or pytest.fail('loaded'))
  time.sleep(0.5)  # many probes
  alive = follower._thread.is_alive()
  follower.stop()
  monkeypatch.undo()
  onednn.set_threads(0)  # the calls' threads as the suite had them
  assert alive and not loads


def test_jit_calls_from_several_threads_at_once_give_each_its_own_result():
  # Each call runs on the thread that reaches it, one call at a time (the
  # pieces share one arena per call): threads running steps side by side get
  # the results each gets alone.
  import concurrent.futures
  rng = np.random.default_rng(7)
  kernel = jax.numpy.asarray(rng.normal(size=(3, 3, 16, 16)) * 0.1, jax.numpy.float32)
  bias = jax.numpy.zeros(16, jax.numpy.float32)

  @jax.jit
  def grads(x):
    return jax.grad(lambda x, k: jax.numpy.sum(
        onednn.conv_layer(x, k, bias, activation='relu') ** 2), argnums=(0, 1))(x, kernel)

  xs = [jax.numpy.asarray(rng.normal(size=(8, 8, 8, 16)), jax.numpy.float32)
        for _ in range(4)]
  alone = [jax.block_until_ready(grads(x)) for x in xs]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for _ in range(5):
      together = list(pool.map(lambda x: jax.block_until_ready(grads(x)), xs))
      for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(together)):
        np.testing.assert_array_equal(a, b)
