"""Read TensorFlow 1 checkpoints ("tensor bundles") without TensorFlow (SPEC §8.1, §8.3).

A TF1 checkpoint with prefix ``P`` is

* ``P.index``: a LevelDB-format sorted string table (SSTable).  Its data blocks hold
  prefix-compressed ``key -> value`` entries with restart points; an index block maps the
  last key of each data block to that block's handle; a 48-byte footer holds the handles
  of the metaindex and index blocks and the magic ``0xdb4775248b80fb57``.  Every block is
  followed by a compression byte and a *masked* crc32c of block + byte.  The entry with the
  empty key is a ``BundleHeaderProto`` (number of shards, endianness); every other key is a
  variable name and its value a ``BundleEntryProto`` (dtype, shape, shard_id, offset, size,
  crc32c of the tensor bytes, stored *masked* like LevelDB's: ``rot15(crc) + 0xa282ead8``).
* ``P.data-0000K-of-0000N``: the raw little-endian tensor bytes, concatenated.

Why a hand-written reader: no small, well-kept package reads this format without pulling in
TensorFlow (hundreds of MB; never a dependency of simclrv2, SPEC §8.3).  The two protobuf
messages are parsed from the wire format by hand (:func:`_parse_message`) rather than with
the installed ``protobuf`` package, because their ``.proto`` definitions ship only with
TensorFlow: using ``protobuf`` would mean re-declaring the descriptors in Python, which is
more code than the ~30 lines of varint/length-delimited decoding needed for six scalar
fields.  The checksums use ``google-crc32c`` (Google's maintained crc32c binding).

Every size and checksum is verified -- footer magic, block crc32c, entry bounds, shard file
sizes, each tensor's byte count against dtype x shape, and its crc32c -- so a truncated,
tampered or mismatched file raises :class:`~simclrv2.errors.CheckpointError` naming the file
and tensor, never returns garbage weights.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from simclrv2.errors import CheckpointError

__all__ = [
    "TensorEntry",
    "TFCheckpoint",
    "resolve_prefix",
    "masked_crc32c",
    "TABLE_MAGIC",
    "bundle_num_shards",
]

#: Magic number at the end of a LevelDB/TF table file (little-endian fixed64).
TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_BLOCK_TRAILER_LEN = 5  # compression type (1 byte) + masked crc32c (4 bytes)
_MASK_DELTA = 0xA282EAD8

#: TF ``DataType`` enum values -> numpy little-endian dtypes (types.proto).
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
_DTYPE_NAMES = {7: "string", 14: "bfloat16", 20: "resource", 21: "variant"}


def masked_crc32c(data: bytes | memoryview) -> int:
    """crc32c of ``data``, masked as TF/LevelDB store it: ``((c >> 15) | (c << 17)) + 0xa282ead8``."""
    crc = google_crc32c.value(bytes(data))
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


@dataclass(frozen=True)
class TensorEntry:
    """One ``BundleEntryProto``: where a variable's bytes are and how to check them."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored
    sliced: bool = False

    @property
    def dtype_name(self) -> str:
        if self.dtype in _DTYPES:
            return str(_DTYPES[self.dtype])
        return _DTYPE_NAMES.get(self.dtype, f"dtype {self.dtype}")


# ---------------------------------------------------------------- protobuf wire format


def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise CheckpointError(f"checkpoint: {where} is corrupt (a varint runs past its end)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _parse_message(buf: bytes, where: str) -> dict[int, list[int | bytes]]:
    """Protobuf wire format -> ``{field number: [values]}`` (varint -> int, bytes -> bytes,
    fixed32/fixed64 -> int).  Unknown fields are kept and ignored by the callers."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, where)
        number, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise CheckpointError(f"checkpoint: {where} is corrupt (truncated fixed64 field)")
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, where)
            if pos + length > len(buf):
                raise CheckpointError(f"checkpoint: {where} is corrupt (a field runs past its end)")
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            if pos + 4 > len(buf):
                raise CheckpointError(f"checkpoint: {where} is corrupt (truncated fixed32 field)")
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise CheckpointError(f"checkpoint: {where} is corrupt (protobuf wire type {wire})")
        fields.setdefault(number, []).append(value)
    return fields


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_entry(name: str, value: bytes, where: str) -> TensorEntry:
    """``BundleEntryProto``: dtype=1, shape=2 (TensorShapeProto: dim=2 {size=1}), shard_id=3,
    offset=4, size=5, crc32c=6 (fixed32), slices=7."""
    f = _parse_message(value, f"{where} (entry {name!r})")
    dims: list[int] = []
    for shape_bytes in f.get(2, []):
        shape = _parse_message(bytes(shape_bytes), f"{where} (shape of {name!r})")  # type: ignore[arg-type]
        for dim_bytes in shape.get(2, []):
            dim = _parse_message(bytes(dim_bytes), f"{where} (shape of {name!r})")  # type: ignore[arg-type]
            dims.append(_signed64(int(dim.get(1, [0])[-1])))
    if any(d < 0 for d in dims):
        raise CheckpointError(f"checkpoint: {where}: tensor {name!r} has an unknown dimension in {dims}")

    def scalar(number: int) -> int:
        return int(f.get(number, [0])[-1])

    return TensorEntry(name=name, dtype=scalar(1), shape=tuple(dims), shard_id=scalar(3), offset=scalar(4),
                       size=scalar(5), crc32c=scalar(6), sliced=bool(f.get(7)))


# ---------------------------------------------------------------- SSTable (LevelDB table)


def _block_handle(buf: bytes, pos: int, where: str) -> tuple[int, int, int]:
    offset, pos = _varint(buf, pos, where)
    size, pos = _varint(buf, pos, where)
    return offset, size, pos


def _read_block(data: bytes, offset: int, size: int, where: str) -> bytes:
    end = offset + size + _BLOCK_TRAILER_LEN
    if offset < 0 or end > len(data):
        raise CheckpointError(f"checkpoint: {where} is truncated or corrupt (a block at byte {offset} runs past "
                              f"the end of the {len(data)}-byte file)")
    block = data[offset:offset + size]
    compression = data[offset + size]
    (stored_crc,) = struct.unpack_from("<I", data, offset + size + 1)
    if masked_crc32c(data[offset:offset + size + 1]) != stored_crc:
        raise CheckpointError(f"checkpoint: {where} is corrupt (crc32c mismatch in the block at byte {offset})")
    if compression != 0:
        raise CheckpointError(f"checkpoint: {where} uses block compression {compression}, which TF tensor "
                              "bundles never write; the file is not a TF1 checkpoint index")
    return block


def _block_entries(block: bytes, where: str) -> list[tuple[bytes, bytes]]:
    """Decode one block: entries ``(shared, non_shared, value_len, key_delta, value)`` up to the
    restart array (uint32 offsets) and its uint32 count at the end."""
    if len(block) < 4:
        raise CheckpointError(f"checkpoint: {where} is corrupt (a block is too short)")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise CheckpointError(f"checkpoint: {where} is corrupt (bad restart count {num_restarts})")
    entries: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < limit:
        shared, pos = _varint(block, pos, where)
        non_shared, pos = _varint(block, pos, where)
        value_len, pos = _varint(block, pos, where)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise CheckpointError(f"checkpoint: {where} is corrupt (an entry runs past its block)")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos:pos + value_len]))
        pos += value_len
    return entries


def _read_table(index_path: Path) -> list[tuple[bytes, bytes]]:
    """All ``(key, value)`` pairs of an SSTable file, in key order."""
    where = str(index_path)
    try:
        data = index_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint: cannot read {where} ({exc.strerror or exc})") from exc
    if len(data) < _FOOTER_LEN:
        raise CheckpointError(f"checkpoint: {where} is truncated ({len(data)} bytes; a TF index has at least "
                              f"{_FOOTER_LEN})")
    footer = data[-_FOOTER_LEN:]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_LEN - 8)
    if magic != TABLE_MAGIC:
        raise CheckpointError(f"checkpoint: {where} is not a TF1 checkpoint index (bad magic number; truncated "
                              "or not a tensor bundle)")
    _, _, pos = _block_handle(footer, 0, where)  # metaindex (unused by TF bundles)
    index_offset, index_size, _ = _block_handle(footer, pos, where)
    pairs: list[tuple[bytes, bytes]] = []
    for _, handle in _block_entries(_read_block(data, index_offset, index_size, where), where):
        offset, size, _ = _block_handle(handle, 0, where)
        pairs.extend(_block_entries(_read_block(data, offset, size, where), where))
    keys = [k for k, _ in pairs]
    if keys != sorted(keys) or len(set(keys)) != len(keys):
        raise CheckpointError(f"checkpoint: {where} is corrupt (its keys are not sorted and unique)")
    return pairs


# ---------------------------------------------------------------- locating a checkpoint

_CKPT_LINE = re.compile(r'^model_checkpoint_path:\s*"(.*)"\s*$')


def resolve_prefix(path: str | Path) -> Path:
    """The bundle prefix for a directory (with TF's ``checkpoint`` text file, or a single
    ``*.index``), a prefix (``.../model.ckpt-751``), or the ``.index`` / ``.data-*`` path."""
    p = Path(path).expanduser()
    if p.is_dir():
        pointer = p / "checkpoint"
        if pointer.is_file():
            for line in pointer.read_text(errors="replace").splitlines():
                m = _CKPT_LINE.match(line.strip())
                if m:
                    prefix = Path(m.group(1))
                    prefix = prefix if prefix.is_absolute() and Path(f"{prefix}.index").is_file() else p / prefix.name
                    if not Path(f"{prefix}.index").is_file():
                        raise CheckpointError(f"checkpoint: {pointer} names {m.group(1)!r}, but {prefix}.index "
                                              "does not exist")
                    return prefix
            raise CheckpointError(f"checkpoint: {pointer} has no model_checkpoint_path line")
        indexes = sorted(p.glob("*.index"))
        if len(indexes) == 1:
            return indexes[0].with_suffix("")
        raise CheckpointError(f"checkpoint: {p} holds {'no' if not indexes else len(indexes)} TF checkpoint "
                              "index files and no 'checkpoint' file; pass the prefix (e.g. DIR/model.ckpt-751)")
    name = p.name
    if name.endswith(".index"):
        prefix = p.with_name(name[: -len(".index")])
    elif re.search(r"\.data-\d+-of-\d+$", name):
        prefix = p.with_name(re.sub(r"\.data-\d+-of-\d+$", "", name))
    elif name.endswith(".meta"):
        prefix = p.with_name(name[: -len(".meta")])
    else:
        prefix = p
    if not Path(f"{prefix}.index").is_file():
        raise CheckpointError(f"checkpoint: no TF checkpoint at {path} ({prefix}.index does not exist); pass a "
                              "directory with a 'checkpoint' file, a prefix, or the .index file")
    return prefix


# ---------------------------------------------------------------- the checkpoint


class TFCheckpoint:
    """A TF1 tensor bundle opened for reading; tensors are read (and verified) on demand.

    ``TFCheckpoint(path)`` accepts what :func:`resolve_prefix` accepts.  ``entries`` maps each
    variable name to its :class:`TensorEntry`; :meth:`read` returns a numpy array.
    """

    def __init__(self, path: str | Path) -> None:
        self.prefix = resolve_prefix(path)
        self.index_path = Path(f"{self.prefix}.index")
        where = str(self.index_path)
        pairs = _read_table(self.index_path)
        if not pairs or pairs[0][0] != b"":
            raise CheckpointError(f"checkpoint: {where} has no bundle header; it is not a TF1 tensor bundle")
        header = _parse_message(pairs[0][1], f"{where} (header)")
        self.num_shards = int(header.get(1, [1])[-1])
        if int(header.get(2, [0])[-1]) != 0:
            raise CheckpointError(f"checkpoint: {where} was written big-endian, which is not supported")
        if self.num_shards < 1:
            raise CheckpointError(f"checkpoint: {where} declares {self.num_shards} data shards")
        self.entries: dict[str, TensorEntry] = {}
        for key, value in pairs[1:]:
            name = key.decode("utf-8", errors="replace")
            self.entries[name] = _parse_entry(name, value, where)
        self._check_layout()

    def shard_path(self, shard_id: int) -> Path:
        return Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def _check_layout(self) -> None:
        """Every entry lies inside an existing shard, and its byte count equals dtype x shape."""
        sizes: dict[int, int] = {}
        for e in self.entries.values():
            if not 0 <= e.shard_id < self.num_shards:
                raise CheckpointError(f"checkpoint: {self.index_path}: tensor {e.name!r} names shard {e.shard_id} "
                                      f"of {self.num_shards}")
            if e.shard_id not in sizes:
                shard = self.shard_path(e.shard_id)
                try:
                    sizes[e.shard_id] = shard.stat().st_size
                except OSError as exc:
                    raise CheckpointError(f"checkpoint: data file {shard} is missing ({exc.strerror or exc}); the "
                                          "index and the data files must be copied together") from exc
            if e.offset < 0 or e.offset + e.size > sizes[e.shard_id]:
                raise CheckpointError(
                    f"checkpoint: {self.shard_path(e.shard_id)} is truncated or does not belong to "
                    f"{self.index_path}: tensor {e.name!r} needs bytes {e.offset}..{e.offset + e.size} of a "
                    f"{sizes[e.shard_id]}-byte file")
            if e.dtype in _DTYPES and not e.sliced:
                expected = int(np.prod(e.shape, dtype=np.int64)) * _DTYPES[e.dtype].itemsize
                if expected != e.size:
                    raise CheckpointError(f"checkpoint: {self.index_path}: tensor {e.name!r} of shape "
                                          f"{list(e.shape)} ({e.dtype_name}) should take {expected} bytes, the "
                                          f"index says {e.size}")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array, after checking its size and crc32c."""
        if name not in self.entries:
            raise CheckpointError(f"checkpoint: {self.index_path} holds no tensor {name!r}")
        e = self.entries[name]
        if e.sliced or e.dtype not in _DTYPES:
            what = "a partitioned (sliced) variable" if e.sliced else f"of type {e.dtype_name}"
            raise CheckpointError(f"checkpoint: {self.index_path}: tensor {name!r} is {what}, which cannot be read")
        shard = self.shard_path(e.shard_id)
        try:
            with open(shard, "rb") as fh:
                fh.seek(e.offset)
                raw = fh.read(e.size)
        except OSError as exc:
            raise CheckpointError(f"checkpoint: cannot read {shard} ({exc.strerror or exc})") from exc
        if len(raw) != e.size:
            raise CheckpointError(f"checkpoint: {shard} is truncated: tensor {name!r} has {len(raw)} of its "
                                  f"{e.size} bytes")
        if masked_crc32c(raw) != e.crc32c:
            raise CheckpointError(f"checkpoint: {shard} is corrupt: the crc32c of tensor {name!r} does not match "
                                  f"the one recorded in {self.index_path.name}")
        return np.frombuffer(raw, dtype=_DTYPES[e.dtype]).reshape(e.shape).copy()

    def verify(self) -> int:
        """Read and check every readable tensor; returns the number of bytes verified."""
        total = 0
        for name, e in self.entries.items():
            if e.dtype in _DTYPES and not e.sliced:
                self.read(name)
                total += e.size
        return total


def bundle_num_shards(index_path: str | Path) -> int:
    """Number of data shards a bundle index declares (reads the index only, not the shards);
    the downloader uses it to know which ``.data-*`` files to fetch."""
    pairs = _read_table(Path(index_path))
    if not pairs or pairs[0][0] != b"":
        raise CheckpointError(f"checkpoint: {index_path} has no bundle header; it is not a TF1 tensor bundle")
    return int(_parse_message(pairs[0][1], f"{index_path} (header)").get(1, [1])[-1])
