"""Tensor parallelism with JAX's own collectives: one JAX process per TP rank, joined by
`jax.distributed.initialize` at the host's rendezvous, and the step's programs run under
`shard_map` over a one-axis mesh ("tp") of the world's devices, one per process, in rank order.
psum and all_gather inside the programs are XLA's CPU collectives (gloo), never torch's.

What `Mesh` does with the runner's arrays (all zero-copy: a global array is assembled from the
rank's own buffer):
- per-rank arrays (weights, the KV pools, the body's outputs): a global array [tp, *local shape],
  block r on rank r; inside the program each rank sees its [1, ...] block, squeezed.
- replicated inputs (token ids, positions, attention inputs, logits rows): each rank passes its
  own identical copy (SGLang hands every rank the same batch).
The results come back as each rank's own block.

Bounds: joining waits at most `INIT_TIMEOUT` seconds for the other ranks. When a peer dies, a
collective fails at once and JAX's coordination service ends this process within
`HEARTBEAT_TIMEOUT` seconds (a hung peer too); SGLang then ends the server (`peer_watch`).
JAX joins one distributed world per process, before any other JAX work in it: the runner
starts it first, so in a process with tp_size > 1 make the runner before any other object of
the backend (SGLang and `sglang_fx.generate.Session` do).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
import torch
from jax.sharding import NamedSharding, PartitionSpec

from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.parallel import Parallel

from .exchange import JaxExchange
from .layers import Collectives
from .placement import place_each_once

INIT_TIMEOUT = 300  # s, for every rank to join
HEARTBEAT_TIMEOUT = 30  # s, after which a silent peer ends the world

_started: Parallel | None = None  # the layout this process's world was joined for


def start(parallel: Parallel) -> None:
    """Join this process to its JAX world (once per process; again with the same layout is a no-op)."""
    global _started
    rdv = parallel.rendezvous
    if parallel.tp.ranks != tuple(range(rdv.world_size)):
        raise UnsupportedConfigError(
            f"jax backend: the TP group {parallel.tp.name!r} {list(parallel.tp.ranks)} must be the whole world of "
            f"{rdv.world_size} ranks (one JAX world per data-parallel replica; attention DP is not supported)"
        )
    if _started is not None:
        if _started != parallel:
            raise UnsupportedConfigError(f"jax backend: JAX's collectives already run for {_started.describe()} in this "
                                         f"process; one process serves one layout (asked for {parallel.describe()})")  # fmt: skip
        return
    address = f"{rdv.host}:{rdv.port}"
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=rdv.world_size, process_id=rdv.rank,
                                   coordinator_bind_address=address if rdv.rank == 0 else None,
                                   initialization_timeout=INIT_TIMEOUT, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT)  # fmt: skip
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise UnsupportedConfigError(
                "jax backend: JAX was already used in this process before the tensor-parallel runner could join its "
                "world (jax.distributed.initialize must come first); make the runner before any other object of the backend"
            ) from None
        raise
    _started = parallel


class Mesh:
    """The placement of a TP rank (see the module docstring); same methods as `SingleDevice`."""

    def __init__(self, parallel: Parallel):
        start(parallel)
        self.size = parallel.tp_size
        self.collectives = Collectives(self.size, "tp")
        self.mesh = jax.sharding.Mesh(np.array(jax.devices()), ("tp",))
        self.per_rank = NamedSharding(self.mesh, PartitionSpec("tp"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.exchange = JaxExchange()
        self._pools: tuple | None = None  # (the cache, its K arrays, its V arrays)

    def _block(self, local: jax.Array) -> jax.Array:
        """This rank's array -> the global [tp, *shape] array whose block r is rank r's."""
        return jax.make_array_from_single_device_arrays((self.size, *local.shape[1:]), self.per_rank, [local])

    def weights(self, tree):
        """This rank's torch weights (a pytree) -> per-rank global arrays aliasing them."""
        return place_each_once(tree, lambda t: self._block(self.exchange.from_torch(t.unsqueeze(0))))

    def pools(self, cache) -> tuple[tuple, tuple | None]:
        """The KV cache's host buffers as per-rank global arrays, made when a cache first comes."""
        if self._pools is None or self._pools[0] is not cache:
            glob = lambda bufs: None if bufs is None else tuple(self._block(self.exchange.from_torch(b.unsqueeze(0), copy=False)) for b in bufs)  # noqa: E731
            self._pools = (cache, glob(cache.k_buffers), glob(cache.v_buffers))
        return self._pools[1:]

    def jit(self, fn: Callable, sharded: tuple[int, ...]) -> Callable:
        """fn under shard_map: the arguments at `sharded` positions (pytrees) per rank, the others
        replicated; every output per rank."""
        from jax import shard_map

        def local(*args):
            args = [jax.tree.map(lambda a: a[0], x) if i in sharded else x for i, x in enumerate(args)]
            return jax.tree.map(lambda a: a[None], fn(*args))

        compiled: list[Callable] = []  # built on the first call, when the number of arguments is known

        def call(*args):
            if not compiled:
                specs = tuple(PartitionSpec("tp") if i in sharded else PartitionSpec() for i in range(len(args)))
                compiled.append(jax.jit(shard_map(local, mesh=self.mesh, in_specs=specs, out_specs=PartitionSpec("tp"), check_vma=False)))
            return compiled[0](*args)

        return call

    def replicate(self, tree):
        """Host arrays (numpy), identical on every rank -> replicated global arrays."""
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree)

    def local(self, x: jax.Array) -> torch.Tensor:
        """This rank's block of a per-rank output, as a torch tensor without a copy."""
        return torch.from_dlpack(x.addressable_data(0))[0]
