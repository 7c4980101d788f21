"""A minimal TensorBoard event-file writer (scalars only), with no TensorBoard dependency.

Event files are TFRecord files of ``Event`` protocol buffers. Each record is
``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``
(little endian); the protocol buffers are encoded by hand here (a handful of fields).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from pathlib import Path

__all__ = ["EventWriter", "crc32c", "read_events"]


def _make_table() -> list[int]:
    poly = 0x82F63B78  # Castagnoli, reflected
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None, summary=b"") -> bytes:
    msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        msg += _field_bytes(3, file_version.encode())
    if summary:
        msg += _field_bytes(5, summary)
    return msg


def _scalar_summary(tag: str, value: float) -> bytes:
    val = _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)
    return _field_bytes(1, val)


class EventWriter:
    """Append scalar summaries to ``logdir/events.out.tfevents.<time>.<host>``."""

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = self.logdir / name
        self._f = open(self.path, "ab")  # noqa: SIM115 - kept open for the run
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        try:
            self._f.write(header + struct.pack("<I", _masked(crc32c(header))))
            self._f.write(data + struct.pack("<I", _masked(crc32c(data))))
            self._f.flush()
        except OSError as e:  # a full disk: name the file (closing would flush it again)
            with contextlib.suppress(OSError):
                self._f.close()
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = b"".join(_scalar_summary(k, float(v)) for k, v in values.items())
        self._write(_event(time.time(), int(step), summary=summary))

    def close(self) -> None:
        self._f.close()


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def _fields(buf: bytes):
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _read_varint(buf, i)
        elif wire == 1:
            val, i = buf[i : i + 8], i + 8
        elif wire == 5:
            val, i = buf[i : i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            val, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, val


def read_events(path: str | Path) -> list[tuple[int, dict[str, float]]]:
    """Read back (step, {tag: value}) of every scalar event, checking every CRC."""
    data = Path(path).read_bytes()
    out = []
    i = 0
    while i < len(data):
        header = data[i : i + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[i + 8 : i + 12])
        if hcrc != _masked(crc32c(header)):
            raise ValueError(f"corrupt event header at byte {i} of {path}")
        body = data[i + 12 : i + 12 + n]
        (bcrc,) = struct.unpack("<I", data[i + 12 + n : i + 16 + n])
        if bcrc != _masked(crc32c(body)):
            raise ValueError(f"corrupt event record at byte {i} of {path}")
        i += 16 + n
        step, scalars = 0, {}
        for num, val in _fields(body):
            if num == 2:
                step = val
            elif num == 5:
                for _, v in _fields(val):
                    fields = dict(_fields(v))
                    scalars[fields[1].decode()] = struct.unpack("<f", fields[2])[0]
        if scalars:
            out.append((step, scalars))
    return out
