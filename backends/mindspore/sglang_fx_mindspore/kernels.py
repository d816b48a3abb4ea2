"""Small MindSpore building blocks: the in-place KV write (its own graph) and a no-op-free cast.

MindSpore 2.10 has no in-place row scatter on CPU in PyNative: Tensor.index_put_/index_copy_/
scatter_ have no CPU kernel, and ops.scatter_update / tensor-index __setitem__ return new storage.
Inside a jit graph, ops.scatter_update writes a `mutable` input in place at a cost proportional
to the rows written, provided that graph does not also read that tensor (then MindSpore copies
the whole buffer) and does not return it (likewise). The model's jit step therefore reads the
pool through other views of the same memory (`MindSporeKVCache`); outside it (PyNative, and the
SPI's per-layer Attention.forward) KV writes run in this module's own graph.
"""

from __future__ import annotations

import functools

import mindspore as ms
from mindspore import Tensor, enable_dynamic, mutable, ops


def write_rows(buffer: Tensor, slots: Tensor, rows: Tensor) -> None:
    """buffer[slots] = rows, in place: buffer [S, ...]; slots [n] int64; rows [n, ...], cast to
    the buffer's dtype."""
    _rows_writer(buffer.dtype)(mutable((buffer,)), slots, cast(rows, buffer.dtype).expand_dims(0))


@functools.cache
def _rows_writer(dtype):
    """`write(buffers, slots, rows)`: for every i, buffers[i][slots] = rows[i], in place.
    buffers: mutable tuple of [S, ...] tensors of `dtype`; slots [n] int64; rows [len(buffers),
    n, ...] of `dtype`. One graph per dtype and tuple length; any n and row shape reuse it."""

    @enable_dynamic(slots=Tensor(shape=[None], dtype=ms.int64), rows=Tensor(shape=None, dtype=dtype))
    @ms.jit
    def write(buffers, slots, rows):
        for i in range(len(buffers)):
            ops.scatter_update(buffers[i], slots, rows[i])

    return write


def cast(x: Tensor, dtype) -> Tensor:
    """x in dtype, launching no kernel when it already is (a compile-time test under jit)."""
    if x.dtype == dtype:
        return x
    return x.astype(dtype)
