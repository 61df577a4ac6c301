"""Launch arguments of a multi-process run, checked before anything starts."""

import jax
import pytest

from et_flax import distributed


@pytest.mark.parametrize('arguments, message', [
    (dict(coordinator_address='10.0.0.1:1234'),
     '--coordinator_address given without --num_processes, --process_id'),
    (dict(num_processes=2, process_id=1),
     '--num_processes, --process_id given without --coordinator_address'),
    (dict(coordinator_address='10.0.0.1', num_processes=2, process_id=0),
     "--coordinator_address='10.0.0.1': expected HOST:PORT"),
    (dict(coordinator_address='10.0.0.1:99999', num_processes=2, process_id=0),
     'expected HOST:PORT'),
    (dict(coordinator_address='h:1', num_processes=0, process_id=0),
     '--num_processes=0: expected 1 or more'),
    (dict(coordinator_address='h:1', num_processes=2, process_id=2),
     '--process_id=2: expected 0 to 1'),
    (dict(coordinator_address='h:1', num_processes=2, process_id=0,
          heartbeat_timeout_seconds=0), '--heartbeat_timeout_seconds=0'),
])
def test_inconsistent_launch_arguments_are_named(arguments, message):
  full = dict(coordinator_address=None, num_processes=None, process_id=None,
              auto_detect=False)
  full.update(arguments)
  with pytest.raises(distributed.LaunchError, match=message.replace('(', r'\(')):
    distributed.check_launch(**full)


def test_launches():
  alone = distributed.check_launch(None, None, None, auto_detect=False)
  assert not alone.multi_process
  by_hand = distributed.check_launch('127.0.0.1:1234', 2, 1, auto_detect=True)
  assert by_hand.multi_process and not by_hand.auto_detect  # the flags win
  assert distributed.check_launch(None, None, None, auto_detect=True).auto_detect


def test_main_names_a_bad_launch_before_any_work(tmp_path, run_command):
  code, _, stderr = run_command('et_flax.main', '--config=configs/quickstart.py',
                                f'--workdir={tmp_path / "run"}', '--process_id=1')
  assert code == 1
  assert stderr.splitlines()[0].startswith(
      'error: --process_id given without --coordinator_address, --num_processes: ')
  assert 'Traceback' not in stderr
  assert not (tmp_path / 'run').exists()


def test_host_rows_of_one_process_are_the_whole_batch():
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  assert distributed.host_rows(sharding, 8 * jax.device_count()) == slice(
      0, 8 * jax.device_count())
