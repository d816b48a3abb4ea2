"""Parallelism as the host hands it to a backend: this process's ranks, its groups by the host's
names, and where the backend's own collective library meets its peers.

The host decides, the backend executes. SGLang (or the standalone runner, `sglang_fx.distributed`)
owns the process layout: it starts the processes, numbers them, builds its torch.distributed
groups, and passes the result here, in `RunnerOptions.parallel`. A backend never invents a
topology: it creates its own communicators (MindSpore's mccl/HCCL, JAX's gloo collectives,
torch.distributed for the reference) for exactly these groups, under these names, and runs the
collectives inside its own graphs.

Layout (as SGLang's): a world of `tp.size` processes per data-parallel replica (each DP replica
is a world of its own, unless attention DP is on, which sglang-fx does not support). Attention
and dense layers are split `tp.size` ways over the TP group. MoE layers are split over the same
group, `ep_size` ways by expert and `tp.size // ep_size` ways inside each expert; every MoE
partial sum is reduced over the TP group. What each rank holds is `sglang_fx.sharding.Shard`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Group:
    """One process group of the host.

    name        the host's unique name for the group (SGLang's GroupCoordinator.unique_name,
                e.g. "tp:0"): a backend creates its own communicator for the group under it.
    ranks       global ranks (in the host's world) of the members, in group order.
    rank        this process's index in `ranks` (its rank in the group).
    torch_group the host's torch.distributed ProcessGroup for the group (gloo on CPU), or None
                when the host has none (a backend that collects through torch.distributed needs it).
    native      the host's native communicator for the device, when it has one: on Ascend the
                HCCL communicator handle (an int) of this group, which a MindSpore backend
                reuses instead of creating a second communicator; else None.
    """

    name: str
    ranks: tuple[int, ...]
    rank: int
    torch_group: Any = field(default=None, compare=False, repr=False)
    native: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < len(self.ranks):
            raise ValueError(f"group {self.name!r}: rank {self.rank} is outside its {len(self.ranks)} members")

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def global_rank(self) -> int:
        return self.ranks[self.rank]


@dataclass(frozen=True)
class Rendezvous:
    """Where a backend's own collective library starts: `host`:`port` is reserved for the
    backend (the host uses neither for itself), and is the same on every rank of the world;
    the process with `rank` 0 serves it (e.g. MindSpore's scheduler process). world_size and
    rank are the host world's (one DP replica's): world_size == sum of processes, rank this one's."""

    host: str
    port: int
    world_size: int
    rank: int


@dataclass(frozen=True)
class Parallel:
    """This process's place in the layout, handed to a backend in `RunnerOptions.parallel`.

    tp          the tensor-parallel group (attention, dense MLP, vocabulary, and the group
                every MoE partial sum is reduced over). Size 1 when nothing is split.
    ep_size     ways the routed experts are split over the TP group (1: every rank holds a
                slice of every expert); divides tp.size.
    dp_size, dp_rank  data-parallel replicas and this process's replica: informative only, a
                replica is a world of its own and its backend needs nothing from the others.
    rendezvous  where the backend's collective library meets, or None when tp.size == 1 (a
                backend then starts no collective library at all).
    """

    tp: Group = Group("tp", (0,), 0)
    ep_size: int = 1
    dp_size: int = 1
    dp_rank: int = 0
    rendezvous: Rendezvous | None = None

    def __post_init__(self) -> None:
        if self.ep_size < 1 or self.tp.size % self.ep_size:
            raise ValueError(f"ep_size {self.ep_size} must divide the tensor-parallel size {self.tp.size}")
        if self.tp.size > 1 and self.rendezvous is None:
            raise ValueError("a tensor-parallel layout needs a rendezvous for the backend's collectives")

    @property
    def tp_size(self) -> int:
        return self.tp.size

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def moe_tp_size(self) -> int:
        """Ways each expert is split: tp_size // ep_size."""
        return self.tp.size // self.ep_size

    @property
    def ep_rank(self) -> int:
        """This rank's expert slice (SGLang: tp_rank // moe_tp_size)."""
        return self.tp.rank // self.moe_tp_size

    @property
    def moe_tp_rank(self) -> int:
        return self.tp.rank % self.moe_tp_size

    def describe(self) -> str:
        return f"tp {self.tp.rank}/{self.tp.size} ({self.tp.name}), ep {self.ep_rank}/{self.ep_size}, dp {self.dp_rank}/{self.dp_size}"


#: The layout of a single process: nothing split, no collectives.
SINGLE = Parallel()
