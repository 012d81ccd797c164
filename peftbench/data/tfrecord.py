"""TFRecord files of ``tf.train.Example`` messages, read (and, for tests and fixtures, written) without TensorFlow.

A TFRecord file is a sequence of records, each framed as (TensorFlow's ``tensorflow/core/lib/io/record_writer.cc``)::

    uint64 length (little endian) | uint32 masked CRC-32C of the 8 length bytes | data | uint32 masked CRC-32C of data

with ``masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8`` (mod 2^32). ``tensorflow_datasets`` writes one
serialised ``tf.train.Example`` per record (``tensorflow/core/example/example.proto`` and ``feature.proto``)::

    Example    { Features features = 1; }
    Features   { map<string, Feature> feature = 1; }          // map entry: key = 1, value = 2
    Feature    { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    BytesList  { repeated bytes value = 1; }
    FloatList  { repeated float value = 1 [packed = true]; }  // packed or not: both are read
    Int64List  { repeated int64 value = 1 [packed = true]; }

Four fixed messages are decoded here by their wire format (varints, length-delimited fields, fixed32 floats): the
issue asks for a small reader, and TensorFlow (or generated protobuf classes) for four messages would be a heavy
dependency for nothing. CRC-32C comes from ``google-crc32c`` (Google's C implementation, the checksum TensorFlow
uses). Bytes features are returned as (start, end) offsets into the record, so that an image can be read later from
its file without keeping every record in memory.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

try:  # the C implementation; its pure-Python fallback is the same function, slower
    import google_crc32c as _crc
except ImportError:  # pragma: no cover - a declared dependency
    _crc = None

_MASK_DELTA = 0xA282EAD8


class RecordError(ValueError):
    """A TFRecord file or an Example in it that cannot be read (the message names the file and the record)."""


def crc32c(data: bytes) -> int:
    if _crc is None:  # pragma: no cover
        raise RecordError("checking TFRecord checksums needs the google-crc32c package (pip install google-crc32c)")
    return int(_crc.value(bytes(data)))


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF


@dataclass(frozen=True)
class Record:
    """One record of a file: its position (``offset`` of the framing, ``start`` of the data) and its data."""

    index: int
    offset: int
    start: int
    data: bytes


def scan(fh: BinaryIO, name: str, *, want=None, check: bool = True) -> Iterator[Record | int]:
    """Walk the records of an open TFRecord file. ``want(index)`` says whether a record's data is read (default:
    every record); the others are skipped with a seek and yielded as their index only. ``check``: verify the CRCs
    of the lengths and of the data read. Errors name ``name`` and the record."""
    index, offset = 0, fh.tell()
    while True:
        head = fh.read(12)
        if not head:
            return
        if len(head) < 12:
            raise RecordError(f"{name}: record {index} at byte {offset} is truncated (the file ends in its header)")
        length, len_crc = struct.unpack("<QI", head)
        if check and masked_crc(head[:8]) != len_crc:
            raise RecordError(f"{name}: record {index} at byte {offset}: the length's checksum is wrong "
                              "(not a TFRecord file, or a corrupt one)")
        start = offset + 12
        if want is None or want(index):
            data = fh.read(length)
            tail = fh.read(4)
            if len(data) < length or len(tail) < 4:
                raise RecordError(f"{name}: record {index} at byte {offset} is truncated")
            if check and masked_crc(data) != struct.unpack("<I", tail)[0]:
                raise RecordError(f"{name}: record {index} at byte {offset}: the data's checksum is wrong (corrupt)")
            yield Record(index, offset, start, data)
        else:
            fh.seek(length + 4, 1)
            yield index
        offset = start + length + 4
        index += 1


def count_records(path: Path) -> int:
    """The number of records of a file (framing only: lengths are checked, data is skipped)."""
    n = 0
    with open(path, "rb") as fh:
        for _ in scan(fh, str(path), want=lambda i: False):
            n += 1
        end = fh.tell()
        fh.seek(0, 2)
        if fh.tell() < end:
            raise RecordError(f"{path}: the last record is truncated")
    return n


# ---------------------------------------------------------------------------------------------
# tf.train.Example
# ---------------------------------------------------------------------------------------------


@dataclass
class Feature:
    """One feature of an Example: ``kind`` is bytes | float | int64 | empty; bytes values are (start, end) offsets
    into the record data, numbers are numpy arrays."""

    kind: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    values: np.ndarray | None = None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise RecordError("a varint runs past the end of its message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise RecordError("a varint is longer than 10 bytes")


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _varint(buf, pos)
            yield num, wt, v, pos
        elif wt == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise RecordError(f"field {num} runs past the end of its message")
            yield num, wt, pos, pos + n
            pos += n
        elif wt == 5:
            yield num, wt, pos, pos + 4
            pos += 4
        elif wt == 1:
            yield num, wt, pos, pos + 8
            pos += 8
        else:
            raise RecordError(f"unsupported protobuf wire type {wt} (field {num})")
    if pos != end:
        raise RecordError("a message runs past its declared length")


def _feature(buf: bytes, start: int, end: int) -> Feature:
    for num, wt, a, b in _fields(buf, start, end):
        if wt != 2 or num not in (1, 2, 3):
            continue
        if num == 1:
            return Feature("bytes", [(s, e) for n2, w2, s, e in _fields(buf, a, b) if n2 == 1 and w2 == 2])
        if num == 2:
            vals: list[float] = []
            for n2, w2, s, e in _fields(buf, a, b):
                if n2 != 1:
                    continue
                if w2 == 2:  # packed
                    vals.extend(np.frombuffer(buf[s:e], dtype="<f4").tolist())
                elif w2 == 5:
                    vals.append(struct.unpack("<f", buf[s:e])[0])
            return Feature("float", values=np.asarray(vals, dtype=np.float32))
        ints: list[int] = []
        for n2, w2, s, e in _fields(buf, a, b):
            if n2 != 1:
                continue
            if w2 == 2:  # packed varints
                p = s
                while p < e:
                    v, p = _varint(buf, p)
                    ints.append(v)
            elif w2 == 0:
                ints.append(s)  # _fields yields the varint's value for wire type 0
        signed = [v - (1 << 64) if v >= 1 << 63 else v for v in ints]
        return Feature("int64", values=np.asarray(signed, dtype=np.int64))
    return Feature("empty", values=np.zeros(0))


def parse_example(buf: bytes) -> dict[str, Feature]:
    """The features of one serialised ``tf.train.Example`` by name."""
    out: dict[str, Feature] = {}
    for num, wt, a, b in _fields(buf, 0, len(buf)):
        if num != 1 or wt != 2:
            continue
        for n2, w2, s, e in _fields(buf, a, b):  # Features.feature: repeated map entries
            if n2 != 1 or w2 != 2:
                continue
            key, feat = None, Feature("empty", values=np.zeros(0))
            for n3, w3, s3, e3 in _fields(buf, s, e):
                if n3 == 1 and w3 == 2:
                    key = bytes(buf[s3:e3]).decode("utf-8")
                elif n3 == 2 and w3 == 2:
                    feat = _feature(buf, s3, e3)
            if key is not None:
                out[key] = feat
    return out


# ---------------------------------------------------------------------------------------------
# writing (fixtures and tests; tensorflow_datasets writes the real files)
# ---------------------------------------------------------------------------------------------


def _enc_varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _enc_varint(num << 3 | 2) + _enc_varint(len(payload)) + payload


def encode_example(features: dict[str, bytes | list[bytes] | list[int] | list[float] | int | float]) -> bytes:
    """A serialised ``tf.train.Example``: bytes (or a list of bytes) → BytesList, ints → Int64List (packed),
    floats → FloatList (packed)."""
    entries = b""
    for key, value in features.items():
        vals = value if isinstance(value, list) else [value]
        if vals and isinstance(vals[0], (bytes, bytearray)):
            kind = _len_field(1, b"".join(_len_field(1, bytes(v)) for v in vals))  # type: ignore[arg-type]
        elif vals and isinstance(vals[0], float):
            kind = _len_field(2, _len_field(1, np.asarray(vals, dtype="<f4").tobytes()))
        else:
            kind = _len_field(3, _len_field(1, b"".join(_enc_varint(int(v)) for v in vals)))  # type: ignore[arg-type]
        entries += _len_field(1, _len_field(1, key.encode()) + _len_field(2, kind))
    return _len_field(1, entries)


def write_records(path: Path, records: list[bytes]) -> None:
    """A TFRecord file of ``records`` (framed and checksummed as TensorFlow writes them)."""
    with open(path, "wb") as fh:
        for data in records:
            head = struct.pack("<Q", len(data))
            fh.write(head + struct.pack("<I", masked_crc(head)) + data + struct.pack("<I", masked_crc(data)))
