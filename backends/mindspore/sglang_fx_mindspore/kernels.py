"""Small MindSpore building blocks: the in-place KV write (its own graph), a no-op-free cast, and
Parameters that alias placed tensors.

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
from mindspore import Parameter, Tensor, enable_dynamic, mutable, ops
from mindspore.common.initializer import Zero


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


def flat_parameters(tree) -> tuple[Parameter, ...]:
    """The Parameters of a `parameters` tree, in order, each once."""
    if isinstance(tree, tuple):
        seen = {}
        for p in (q for t in tree for q in flat_parameters(t)):
            seen.setdefault(id(p), p)
        return tuple(seen.values())
    return (tree,)


def parameters(tree, name: str = "w"):
    """Nested tuples of tensors as the same tree of Parameters over the same memory (named by
    their place in the tree). A Cell's Parameters reach its compiled graph at no per-call cost,
    where each tensor argument costs about 10 us a call (measured on CPU). Parameter(t) would copy
    t; a Parameter made without data and then given t by set_data shares it."""
    if isinstance(tree, tuple):
        return tuple(parameters(t, f"{name}.{i}") for i, t in enumerate(tree))
    p = Parameter(Tensor(shape=tree.shape, dtype=tree.dtype, init=Zero()), name=name, requires_grad=False)
    p.set_data(tree)
    return p
