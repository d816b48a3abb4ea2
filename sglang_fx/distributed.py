"""The standalone host's tensor-parallel worlds: N local processes, one torch.distributed (gloo)
world, and each rank's `Parallel`. SGLang plays this part inside its server; this one serves
`sglang-fx conformance --tp N`, the benchmarks and the tests.

`run_parallel(fn, tp_size)` runs `fn(parallel, *args)` on every rank and returns the results in
rank order. Every wait is bounded: a rank that raises, dies or outlives the deadline ends the
whole world, and the error names the rank and what it printed.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import random
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from .parallel import Group, Parallel, Rendezvous

#: The TP group's name in standalone worlds (SGLang names its first TP group the same way).
TP_GROUP = "tp:0"
HOST = "127.0.0.1"
#: Seconds a finished rank may spend in interpreter teardown before it is ended.
EXIT_GRACE = 30.0


#: Ports this process has handed out: a port is free until its owner binds it, which may be
#: minutes later (a server starting), so a later call must not hand it out again.
_HANDED_OUT: set[int] = set()


def free_ports(n: int, low: int = 30000) -> list[int]:
    """n distinct TCP ports, free now, for servers that bind them later (a rendezvous, an HTTP
    server), none handed out before by this process. They are taken below the kernel's
    ephemeral range and above the 22000-29999 where SGLang takes its own: a port from bind(0)
    is ephemeral, and between this check and the later bind the OS may hand it to any socket
    that binds port 0 (gloo's listeners do), which was seen to take an SGLang server's HTTP
    port. And a port handed out earlier may not be bound yet, since a server binds its port
    minutes after it starts, so finding it free says nothing: CI saw a PD test's server find
    its HTTP port taken while the module's other servers, their ports chosen the same way,
    were running."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = int(f.read().split()[0]) - 1
    except (OSError, ValueError, IndexError):
        high = 32767
    if high + 1 - low < 16 * n:  # the ephemeral range starts low on this host: take what bind(0) gives
        socks: list[socket.socket] = []  # all held bound until the end, so bind(0) never repeats one
        try:
            ports = []
            while len(ports) < n:
                socks.append(socket.socket())
                socks[-1].bind((HOST, 0))
                if (port := socks[-1].getsockname()[1]) not in _HANDED_OUT:
                    ports.append(port)
            _HANDED_OUT.update(ports)
            return ports
        finally:
            for sock in socks:
                sock.close()
    ports: list[int] = []
    # SystemRandom: processes started together (and seeded alike) must not try the same ports.
    for port in random.SystemRandom().sample(range(low, high + 1), high + 1 - low):
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            _HANDED_OUT.update(ports)
            return ports
    raise OSError(f"fewer than {n} free TCP ports between {low} and {high}")


def run_parallel(
    fn: Callable[..., Any],
    tp_size: int,
    *,
    ep_size: int = 1,
    args: Sequence[Any] = (),
    timeout: float = 900.0,
    collective_timeout: float = 300.0,
) -> list[Any]:
    """fn(parallel, *args) on tp_size fresh processes (spawned, so fn and args must pickle),
    ranks 0..tp_size-1 of one gloo world whose TP group is the whole world. Each process gets
    an equal share of this machine's cores for its thread pools. Raises RuntimeError when a rank
    fails, dies, or the run exceeds `timeout` s; a collective that waits on a dead peer gives up
    after `collective_timeout` s."""
    ctx = mp.get_context("spawn")
    torch_port, backend_port = free_ports(2)
    threads = max(1, (os.cpu_count() or 1) // tp_size)
    pipes = [ctx.Pipe(duplex=False) for _ in range(tp_size)]  # (receive, send) per rank
    procs = [
        ctx.Process(target=_worker, name=f"sglang-fx-tp{rank}", daemon=False,
                    args=(rank, tp_size, ep_size, torch_port, backend_port, collective_timeout, threads, fn, tuple(args), send))  # fmt: skip
        for rank, (_, send) in enumerate(pipes)
    ]
    for p in procs:
        p.start()
    for _, send in pipes:
        send.close()  # the children hold their ends: a rank that dies closes its pipe
    waiting = {recv: rank for rank, (recv, _) in enumerate(pipes)}
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while waiting:
            ready = wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError(f"tensor-parallel run did not finish within {timeout:.0f} s; ranks without a result: "
                                   f"{sorted(waiting.values())}")  # fmt: skip
            for recv in ready:
                rank = waiting.pop(recv)
                try:
                    ok, value = recv.recv()
                except EOFError:
                    procs[rank].join(timeout=10)
                    raise RuntimeError(f"tensor-parallel rank {rank} of {tp_size} died (exit code {procs[rank].exitcode}) "
                                       "without a result") from None  # fmt: skip
                if not ok:
                    raise RuntimeError(f"tensor-parallel rank {rank} of {tp_size} failed:\n{value}")
                out[rank] = value
        for p in procs:
            p.join(timeout=60)
        return [out[r] for r in range(tp_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        for recv, _ in pipes:
            recv.close()


def _worker(rank: int, world: int, ep_size: int, torch_port: int, backend_port: int, collective_timeout: float,
            threads: int, fn: Callable[..., Any], args: tuple, result: Connection) -> None:  # fmt: skip
    ok, value = False, ""
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"tcp://{HOST}:{torch_port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=collective_timeout))  # fmt: skip
        parallel = Parallel(
            tp=Group(TP_GROUP, tuple(range(world)), rank, torch_group=dist.group.WORLD),
            ep_size=ep_size,
            rendezvous=Rendezvous(HOST, backend_port, world, rank),
        )
        ok, value = True, fn(parallel, *args)
    except BaseException:
        value = traceback.format_exc()
    result.send((ok, value))
    result.close()
    # Exit normally (resources get released), but a framework's collective runtime may wait on
    # its peers at exit: end the process anyway after EXIT_GRACE s.
    timer = threading.Timer(EXIT_GRACE, os._exit, args=(0 if ok else 1,))
    timer.daemon = True
    timer.start()
    if not ok:
        sys.exit(1)
