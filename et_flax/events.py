"""TensorBoard event files, written without TensorFlow.

clu's `SummaryWriter` writes through TensorFlow; a run must not need it (its
data may come from the decoded cache, on a machine without TensorFlow). An
event file is a TFRecord file of `Event` protos: each record is its length
(uint64), the masked CRC-32C of the length, the bytes and their masked
CRC-32C. The protos come from the `tensorboard` package, which needs no
TensorFlow.
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import time
from collections.abc import Mapping

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord files use it."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """`data` framed as one TFRecord."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', _masked_crc(length)) + data
          + struct.pack('<I', _masked_crc(data)))


class EventWriter:
  """Scalars to `<logdir>/events.out.tfevents.<time>.<host>.<pid>`, for TensorBoard.

  The same calls as clu's metric writers (`write_scalars`, `flush`, `close`).
  """

  def __init__(self, logdir: str | os.PathLike):
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    self.path = logdir / (f'events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.'
                          f'{os.getpid()}')
    self._file = self.path.open('ab')
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))
    self.flush()

  def _write(self, event: event_pb2.Event) -> None:
    self._file.write(tfrecord(event.SerializeToString()))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
        for tag, value in scalars.items()])
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    self.flush()  # once an epoch: TensorBoard shows it now, and a kill loses nothing

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


class NoWriter:
  """Writes nothing: the processes other than the first of a run."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    del step, scalars

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass
