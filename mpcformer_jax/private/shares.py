"""Local operations on one party's SPU shares: join several queries into one batch, pad it,
and cut the batch's output back into each query's rows. Jax-free; nodes import it.

Every protocol served here (ABY3, SEMI2K, CHEETAH) shares a fixed-point value
*arithmetically*: a party holds, per element, one or more ring elements, and the secret is a
linear function of all parties' elements. So, with every party doing the same thing to its
own share:
  * concatenating two shared tensors along an axis gives a sharing of their concatenation;
  * an element whose ring words are all zero, at every party, is a sharing of 0;
  * a slice of a share is a sharing of the slice.
None of this communicates, and none of it reveals anything: the layout (which rows belong to
which query, where the padding is) is public to the nodes anyway, and padding is zero at
every party. Padded positions therefore carry a zero mask, and padded rows a zero input.

A share is a ``libspu.Share``: ``meta`` is a serialized ``spu.ValueMetaProto`` (data type,
visibility, shape, storage type such as ``aby3.AShr<FM64>``) and ``share_chunks`` are
serialized ``spu.ValueChunkProto`` (total_bytes, chunk_offset, content); the content is the
share's ring words, row-major, a fixed number of bytes per element. The two messages are
declared here from SPU's ``libspu/spu.proto`` (the 0.9.5 wheel ships no Python protobuf
classes for them); ``test_service.py`` checks the round trip against ``spu.Io``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import spu.libspu as libspu
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# SPU's own limit per chunk (RuntimeConfig.share_max_chunk_size default is 128 MiB).
_MAX_CHUNK = 64 << 20


def _messages():
    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="mpcformer_spu_value.proto",
                                             package="mpcformer_spu", syntax="proto3")
    shape = fdp.message_type.add(name="ShapeProto")
    shape.field.add(name="dims", number=1, type=f.TYPE_INT64, label=f.LABEL_REPEATED)
    meta = fdp.message_type.add(name="ValueMetaProto")
    meta.field.add(name="data_type", number=1, type=f.TYPE_INT32, label=f.LABEL_OPTIONAL)
    meta.field.add(name="is_complex", number=2, type=f.TYPE_BOOL, label=f.LABEL_OPTIONAL)
    meta.field.add(name="visibility", number=3, type=f.TYPE_INT32, label=f.LABEL_OPTIONAL)
    meta.field.add(name="shape", number=4, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
                   type_name=".mpcformer_spu.ShapeProto")
    meta.field.add(name="storage_type", number=5, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    chunk = fdp.message_type.add(name="ValueChunkProto")
    chunk.field.add(name="total_bytes", number=1, type=f.TYPE_UINT64, label=f.LABEL_OPTIONAL)
    chunk.field.add(name="chunk_offset", number=2, type=f.TYPE_UINT64, label=f.LABEL_OPTIONAL)
    chunk.field.add(name="content", number=3, type=f.TYPE_BYTES, label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName(f"mpcformer_spu.{n}"))
            for n in ("ValueMetaProto", "ValueChunkProto"))


ValueMeta, ValueChunk = _messages()


class ShareError(ValueError):
    """A share is malformed or does not fit the layout asked for."""


def shape_of(share: libspu.Share) -> tuple[int, ...]:
    """The logical shape a share's meta declares."""
    meta = ValueMeta()
    try:
        meta.ParseFromString(share.meta)
    except Exception as err:  # protobuf's DecodeError: a hostile or corrupt meta
        raise ShareError(f"bad share metadata: {err}") from None
    return tuple(int(d) for d in meta.shape.dims)


def to_array(share: libspu.Share) -> tuple[object, np.ndarray]:
    """(meta message, uint8 array of shape ``dims + (bytes per element,)``)."""
    meta = ValueMeta()
    try:
        meta.ParseFromString(share.meta)
        chunks = [ValueChunk.FromString(c) for c in share.share_chunks]
    except Exception as err:
        raise ShareError(f"bad share: {err}") from None
    chunks.sort(key=lambda c: c.chunk_offset)
    data = b"".join(c.content for c in chunks)
    dims = tuple(int(d) for d in meta.shape.dims)
    n = int(np.prod(dims)) if dims else 1
    if n == 0 or len(data) % n or (chunks and chunks[0].total_bytes != len(data)):
        raise ShareError(f"share of shape {dims} holds {len(data)} bytes")
    return meta, np.frombuffer(data, np.uint8).reshape(*dims, len(data) // n)


def from_array(meta, words: np.ndarray) -> libspu.Share:
    """Inverse of ``to_array``: a share of shape ``words.shape[:-1]`` with ``meta``'s type."""
    meta = ValueMeta.FromString(meta.SerializeToString())
    del meta.shape.dims[:]
    meta.shape.dims.extend(words.shape[:-1])
    data = np.ascontiguousarray(words).tobytes()
    share = libspu.Share()
    share.meta = meta.SerializeToString()
    share.share_chunks = [
        ValueChunk(total_bytes=len(data), chunk_offset=i,
                   content=data[i:i + _MAX_CHUNK]).SerializeToString()
        for i in range(0, max(len(data), 1), _MAX_CHUNK)]
    return share


def join_rows(parts: Sequence[libspu.Share], batch: int, length: int) -> libspu.Share:
    """One party's share of a batch: ``parts`` (shares of shape ``(rows_i, length_i, ...)``)
    padded with zeros to ``length`` on axis 1, stacked on axis 0, padded to ``batch`` rows.

    Raises:
      ShareError: parts of different storage types or trailing shapes, a part longer than
        ``length``, or more rows than ``batch``.
    """
    metas, arrays = zip(*(to_array(p) for p in parts), strict=True)
    kinds = {(m.storage_type, m.data_type) for m in metas}
    tails = {a.shape[2:] for a in arrays}
    if len(kinds) != 1 or len(tails) != 1 or any(a.ndim < 3 for a in arrays):
        raise ShareError(f"shares of different kinds cannot be joined: {sorted(kinds)}, "
                         f"trailing shapes {sorted(tails)}")
    rows = sum(a.shape[0] for a in arrays)
    if rows > batch or any(a.shape[1] > length for a in arrays):
        raise ShareError(f"{rows} rows of up to {max(a.shape[1] for a in arrays)} positions "
                         f"do not fit a {batch}x{length} batch")
    out = np.zeros((batch, length, *arrays[0].shape[2:]), np.uint8)
    r = 0
    for a in arrays:
        out[r:r + a.shape[0], :a.shape[1]] = a
        r += a.shape[0]
    return from_array(metas[0], out)


def split_rows(share: libspu.Share, rows: Sequence[int]) -> list[libspu.Share]:
    """Cuts a share of shape ``(batch, ...)`` into consecutive pieces of ``rows[i]`` rows
    (the padded rows after them are dropped)."""
    meta, words = to_array(share)
    if sum(rows) > words.shape[0] or any(r < 1 for r in rows):
        raise ShareError(f"cannot cut rows {list(rows)} out of {words.shape[0]}")
    out, r = [], 0
    for k in rows:
        out.append(from_array(meta, words[r:r + k]))
        r += k
    return out
