"""TensorBoard event files: CRC-32C check value and a write/read round trip."""

import struct

import pytest

from difflab.tensorboard import EventWriter, crc32c, read_events


def test_crc32c_check_value():
    # the standard check value of CRC-32C (RFC 3720, B.4)
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def test_round_trip(tmp_path):
    w = EventWriter(tmp_path)
    w.scalars(10, {"loss": 0.5, "lr": 1e-3})
    w.scalars(20, {"loss": 0.25})
    w.close()
    events = read_events(w.path)
    assert [s for s, _ in events] == [10, 20]
    assert events[0][1]["loss"] == pytest.approx(0.5)
    assert events[0][1]["lr"] == pytest.approx(struct.unpack("<f", struct.pack("<f", 1e-3))[0])
    assert events[1][1] == {"loss": 0.25}


def test_corruption_is_detected(tmp_path):
    w = EventWriter(tmp_path)
    w.scalars(1, {"loss": 1.0})
    w.close()
    data = bytearray(w.path.read_bytes())
    data[-6] ^= 0xFF
    w.path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        read_events(w.path)
