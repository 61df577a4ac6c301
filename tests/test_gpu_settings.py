"""Per-device defaults, decided on the CPU with `Platform`s of other machines."""

import logging

import pytest

from et_flax import settings
from tests.helpers import tiny_config


def _dtype(platform):
  return settings.resolve(tiny_config('/unused'), platform).compute_dtype


def test_bfloat16_only_where_the_device_has_it(caplog):
  assert _dtype(settings.Platform('gpu', native_bfloat16=True)) == 'bfloat16'  # A100, H200
  assert _dtype(settings.Platform('tpu', native_bfloat16=True)) == 'bfloat16'
  assert _dtype(settings.Platform('cpu')) == 'float32'
  with caplog.at_level(logging.INFO):
    t4 = settings.Platform('gpu', native_bfloat16=False, device_kind='Tesla T4')
    assert _dtype(t4) == 'float32'
    assert _dtype(t4) == 'float32'
  said = [r.getMessage() for r in caplog.records if 'no native bfloat16' in r.getMessage()]
  assert len(said) == 1 and 'Tesla T4' in said[0]  # once, and why
  config = tiny_config('/unused', compute_dtype='bfloat16')
  assert settings.resolve(config, t4).compute_dtype == 'bfloat16'  # explicit: kept


def test_native_bfloat16_follows_the_compute_capability():
  class Device:
    def __init__(self, platform, capability=None):
      self.platform, self.compute_capability = platform, capability
  assert settings._native_bfloat16(Device('gpu', '9.0'))  # H100, H200
  assert settings._native_bfloat16(Device('gpu', '8.0'))  # A100
  assert not settings._native_bfloat16(Device('gpu', '7.5'))  # T4
  assert not settings._native_bfloat16(Device('gpu', 'gfx90a'))  # not NVIDIA's numbering
  assert not settings._native_bfloat16(Device('cpu'))
  assert settings._native_bfloat16(Device('tpu'))


def test_gpus_are_deterministic_only_with_the_xla_flag():
  config = tiny_config('/unused')
  on = settings.resolve(config, settings.Platform('gpu', deterministic_gpu_ops=True))
  off = settings.resolve(config, settings.Platform('gpu', deterministic_gpu_ops=False))
  assert on.deterministic and 'deterministic GPU ops' in on.describe()
  assert not off.deterministic and 'not deterministic' in off.describe()
  assert settings.resolve(config, settings.Platform('cpu')).deterministic


@pytest.mark.parametrize('flags, expected', [
    ('', False), ('--xla_gpu_deterministic_ops=true', True),
    ('--xla_gpu_deterministic_ops', True), ('--xla_gpu_deterministic_ops=false', False),
    ('--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false', False),
    ('--xla_gpu_deterministic_ops_x=true', False)])
def test_the_determinism_flag_is_read_from_xla_flags(monkeypatch, flags, expected):
  monkeypatch.setenv('XLA_FLAGS', flags)
  assert settings.deterministic_gpu_ops() is expected


def test_configure_determinism(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  # Once JAX's backends have started, 'auto' says so and 'true' refuses.
  monkeypatch.setattr(settings.xla_bridge, 'backends_are_initialized', lambda: True)
  assert settings.configure_determinism('auto') is False
  with pytest.raises(ValueError, match='backends have already started'):
    settings.configure_determinism('true')
  assert settings.configure_determinism('false') is False
  with pytest.raises(ValueError, match="--deterministic must be one of"):
    settings.configure_determinism('yes')
  monkeypatch.setattr(settings.xla_bridge, 'backends_are_initialized', lambda: False)
  assert settings.configure_determinism('auto') is True
  assert settings.os.environ['XLA_FLAGS'] == (
      '--xla_force_host_platform_device_count=1 --xla_gpu_deterministic_ops=true')
  assert settings.configure_determinism('true') is True  # once only
  assert settings.os.environ['XLA_FLAGS'].count('deterministic') == 1
  # Two explicit settings that disagree: neither is changed.
  with pytest.raises(ValueError, match="--deterministic=false, but XLA_FLAGS turns deterministic GPU ops on"):
    settings.configure_determinism('false')
  monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_deterministic_ops=false')
  assert settings.configure_determinism('false') is False


def test_a_resumed_run_names_the_settings_that_changed():
  config = tiny_config('/unused')
  cpu = settings.resolve(config, settings.Platform('cpu')).to_dict()
  gpu = settings.resolve(config, settings.Platform('gpu', deterministic_gpu_ops=True))
  assert settings.changes(cpu, gpu) == ['backend cpu -> gpu',
                                        'compute_dtype float32 -> bfloat16']
  assert settings.changes(cpu, settings.from_dict(cpu)) == []
  older = {k: v for k, v in cpu.items() if k != 'deterministic'}  # before the field
  assert settings.from_dict(older).deterministic
  assert settings.changes(older, gpu) == ['backend cpu -> gpu',
                                          'compute_dtype float32 -> bfloat16']


def test_an_unused_nvidia_gpu_is_one_warning(monkeypatch, caplog):
  monkeypatch.setattr(settings, 'nvidia_gpu_present', lambda: True)
  monkeypatch.setattr(settings, '_cuda_build_installed', lambda: False)
  monkeypatch.setattr(settings, '_said', set())
  with caplog.at_level(logging.INFO):
    settings.Platform.current()
    settings.Platform.current()
  warnings = [r.getMessage() for r in caplog.records if 'NVIDIA GPU' in r.getMessage()]
  assert warnings == ["an NVIDIA GPU is present, but JAX runs on the CPU (its CUDA build "
                      "is not installed): pip install -e '.[tf,cuda]' (see Install in "
                      "README.md)"]


def test_no_warning_where_the_cuda_build_is_installed(monkeypatch, caplog):
  """JAX runs on the CPU there for another reason (no visible device, say)."""
  monkeypatch.setattr(settings, 'nvidia_gpu_present', lambda: True)
  monkeypatch.setattr(settings, '_cuda_build_installed', lambda: True)
  monkeypatch.setattr(settings, '_said', set())
  with caplog.at_level(logging.INFO):
    settings.Platform.current()
  assert 'NVIDIA GPU' not in caplog.text
