"""MindSpore's own collectives over the host's TP group: started once per process from the host's
`Parallel`, and called inside the step's graph (`Collectives`), never through torch.

Starting (`start`), by device:
- CPU: MindSpore's dynamic cluster with the mccl library. The host's rendezvous names the
  scheduler's address; its rank 0 runs the scheduler as a child process, which dies with it
  (a thread will not do: the scheduler's `init` never returns and holds the GIL). Every rank
  joins as worker `rendezvous.rank` (MS_NODE_ID), so MindSpore's ranks are the host's; waits are
  bounded (`TIMEOUTS`). `init` replaces sys.excepthook: an uncaught error in one rank makes
  MindSpore end its peers.
- Ascend: the HCCL world (`init("hccl")`), and each group reuses the host's own HCCL
  communicator (`Group.native`, SGLang's torch_npu communicator) instead of making a second one,
  as SGLang's own MindSpore runner does. The arguments are built by `hccl_group_options`.
Then the TP group is created under the host's name for it, so a graph's AllReduce names the
same group SGLang's torch code uses.

MindSpore runs one collective world per process: a process joins once, and a second `start`
with the same layout is a no-op (a different one is an error).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import Any

from mindspore import Tensor, nn, ops

from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.parallel import Group, Parallel

#: The layout this process's collective world was started for (None: not started).
_started: Parallel | None = None
_scheduler: subprocess.Popen | None = None

#: The scheduler's program: joining the cluster as MS_SCHED serves it until the workers finish.
SCHEDULER = "import mindspore as ms; from mindspore.communication import init; ms.set_device('CPU'); init('mccl')"


class Collectives(nn.Cell):
    """The TP group's collectives as graph-callable methods (the identity for a group of one, a
    compile-time branch). all_reduce: sum of [*] float32/float16 tensors over the group (mccl's
    AllReduce takes those two dtypes on CPU). gather_columns: [N, C] from every rank ->
    [N, size * C], blocks in group order."""

    def __init__(self, group: str | None, size: int, gather_group: str | None = None):
        """gather_group: the group AllGather names, when not `group` (see `start`)."""
        super().__init__()
        self.size = size
        if size > 1:
            self._sum = ops.AllReduce(ops.ReduceOp.SUM, group=group)
            self._gather = ops.AllGather(group=gather_group or group)

    def all_reduce(self, x: Tensor) -> Tensor:
        if self.size == 1:
            return x
        return self._sum(x)

    def gather_columns(self, x: Tensor) -> Tensor:
        if self.size == 1:
            return x
        n, c = x.shape
        return self._gather(x).reshape(self.size, n, c).transpose(1, 0, 2).reshape(n, self.size * c)


def start(parallel: Parallel, device: str) -> Collectives:
    """Join this process to its collective world (once) and create the TP group; returns the
    group's collectives. For tp_size 1 nothing is started."""
    global _started
    if parallel.tp_size == 1:
        return Collectives(None, 1)
    kind = device.partition(":")[0]
    if kind not in ("cpu", "npu"):
        raise UnsupportedConfigError(f"mindspore backend: tensor parallelism on {device!r} is not supported (cpu: mccl; npu: HCCL)")
    # MindSpore 2.10's CPU AllGather kernel refuses any group but the world ("AllGather only
    # support mccl_world_group on CPU"); a TP group is its whole world here (each DP replica is a
    # world of its own), so on CPU the gather names the world: the same processes.
    from mindspore.communication import GlobalComm

    gather = GlobalComm.WORLD_COMM_GROUP if kind == "cpu" else None
    if kind == "cpu" and parallel.tp.ranks != tuple(range(parallel.rendezvous.world_size)):
        raise UnsupportedConfigError(
            f"mindspore backend on CPU: the TP group {parallel.tp.name!r} {list(parallel.tp.ranks)} must be the whole world "
            f"of {parallel.rendezvous.world_size} ranks (MindSpore's CPU AllGather runs on the world group only)"
        )
    if _started is not None:
        if _started != parallel:
            raise UnsupportedConfigError(
                f"MindSpore's collectives already run for {_started.describe()} in this process; one process "
                f"serves one layout (asked for {parallel.describe()})"
            )
        return Collectives(parallel.tp.name, parallel.tp_size, gather)
    from mindspore.communication import create_group, init

    if kind == "npu":
        init("hccl")
        create_group(parallel.tp.name, list(parallel.tp.ranks), hccl_group_options(parallel.tp))
    else:
        _join_cpu_cluster(parallel)
        init("mccl")
        create_group(parallel.tp.name, list(parallel.tp.ranks))
    _started = parallel
    return Collectives(parallel.tp.name, parallel.tp_size, gather)


#: Bounds on MindSpore's waits (seconds; a value the user set wins). MS_TOPO_TIMEOUT: joining the
#: cluster; without it a rank that never joins stalls `init` for 30 minutes (3600 retries of
#: 0.5 s, measured on 2.10 CPU). A collective whose peer died is left at MindSpore's own bound
#: (MS_CPU_COMM_OP_TIMEOUT unset: it fails after about 30 s, and SGLang then ends the server);
#: its peers compile each new graph in step with it, so they never wait that long on a live one.
TIMEOUTS = {"MS_TOPO_TIMEOUT": "300"}


def cluster_env(parallel: Parallel, role: str = "MS_WORKER") -> dict[str, str]:
    """MindSpore's dynamic-cluster variables for this rank (role MS_WORKER) or the scheduler.
    MS_NODE_ID fixes the worker's MindSpore rank (without it the scheduler numbers workers in a
    random order), so MindSpore's ranks are the host's."""
    rdv = parallel.rendezvous
    env = {"MS_ROLE": role, "MS_WORKER_NUM": str(rdv.world_size), "MS_SCHED_HOST": rdv.host, "MS_SCHED_PORT": str(rdv.port)}
    env |= {k: os.environ.get(k, v) for k, v in TIMEOUTS.items()}
    if role == "MS_WORKER":
        env["MS_NODE_ID"] = str(rdv.rank)
    return env


def _join_cpu_cluster(parallel: Parallel) -> None:
    global _scheduler
    if parallel.rendezvous.rank == 0:
        env = {**os.environ, **cluster_env(parallel, "MS_SCHED")}
        env.pop("MS_NODE_ID", None)
        _scheduler = subprocess.Popen([sys.executable, "-c", SCHEDULER], env=env, preexec_fn=_die_with_parent,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    os.environ.update(cluster_env(parallel))


def _die_with_parent() -> None:
    """In the scheduler's child process, before exec: SIGKILL it when its parent dies (strictly,
    when the thread that spawned it ends: `start` runs on the rank's main thread)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def hccl_group_options(group: Group) -> Any:
    """GroupOptions for create_group that reuse the host's HCCL communicator of `group`
    (`Group.native`, the handle SGLang's torch_npu group holds); None when the host has none
    (MindSpore then makes its own communicator)."""
    if group.native is None:
        return None
    from mindspore._c_expression import GroupOptions  # where MindSpore 2.10 (and SGLang's runner) take it from

    opts = GroupOptions()
    opts.hccl_config = {"hccl_comm": int(group.native)}
    return opts
