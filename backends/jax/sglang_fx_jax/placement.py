"""Where the step's arrays live and how its programs are compiled: one process
(`SingleDevice`), or a tensor-parallel world of processes with JAX's own collectives (`Mesh`,
in collectives.py). The runner calls the same methods either way; the Decoder's functions only
see this rank's arrays and call `collectives`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import torch

from sglang_fx.parallel import Parallel

from .exchange import JaxExchange
from .layers import Collectives


class SingleDevice:
    """tp_size 1: arrays are plain single-device JAX arrays, programs plain jax.jit."""

    collectives = Collectives(1)

    def __init__(self):
        self.exchange = JaxExchange()

    def weights(self, tree):
        """Torch tensors (a pytree) -> JAX arrays aliasing them."""
        return place_each_once(tree, self.exchange.from_torch)

    def jit(self, fn: Callable, sharded: tuple[int, ...]) -> Callable:
        """fn, compiled per input shapes. sharded: the positions of its per-rank arguments."""
        return jax.jit(fn)

    def pools(self, cache) -> tuple[tuple, tuple | None]:
        """The KV cache's per-layer K and V arrays (V None without a V pool), as the body takes them."""
        return cache.keys, cache.values

    def replicate(self, x):
        return x

    def local(self, x: jax.Array) -> torch.Tensor:
        """A program's output as a torch tensor, without a copy."""
        return torch.from_dlpack(x)


def place_each_once(tree, one: Callable[[torch.Tensor], jax.Array]):
    """`one` applied to every torch tensor of a pytree; a tensor that appears twice (a tied
    embedding) is placed once and shared."""
    placed: dict[int, jax.Array] = {}

    def once(t: torch.Tensor) -> jax.Array:
        if id(t) not in placed:
            placed[id(t)] = one(t)
        return placed[id(t)]

    return jax.tree.map(once, tree)


def place(parallel: Parallel):
    if parallel.tp_size == 1:
        return SingleDevice()
    from .collectives import Mesh

    return Mesh(parallel)
