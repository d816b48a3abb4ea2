"""The in-place KV row write, as a small MindSpore graph.

MindSpore 2.10 has no in-place row scatter on CPU in PyNative: Tensor.index_put_/index_copy_/
scatter_ have no CPU kernel, and ops.scatter_update / tensor-index __setitem__ return new storage.
Inside a graph, ops.scatter_update writes a `mutable` (or top-level) input in place at a cost
proportional to the rows written, and MindSpore's side-effect ordering puts later reads of that
buffer after the write. So every KV write goes through `row_writer`: PyNative code calls it like
an op; a jit graph that calls it inlines it. It returns nothing on purpose: a graph that returns
its input buffer copies the whole buffer.
"""

from __future__ import annotations

import functools

import mindspore as ms
from mindspore import Tensor, enable_dynamic, ops


@functools.cache
def row_writer(dtype):
    """`write(buffer [S, ...], slots [n] int64, rows [n, ...])`: buffer[slots] = rows in place
    (rows already in buffer's dtype). One graph per dtype; any n and row shape reuse it."""

    @enable_dynamic(slots=Tensor(shape=[None], dtype=ms.int64), rows=Tensor(shape=None, dtype=dtype))
    @ms.jit
    def write(buffer, slots, rows):
        ops.scatter_update(buffer, slots, rows)

    return write
