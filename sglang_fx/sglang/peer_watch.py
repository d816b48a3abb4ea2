"""Ends an SGLang scheduler whose tensor-parallel peer died, at once, whatever it is waiting on.

A backend's collectives may wait long on a dead peer: MindSpore's mccl gives up after about 30 s
per collective, and an SGLang 0.5.23 scheduler stuck in one was seen not to recover for minutes;
with data parallelism no SGLang process watches the schedulers themselves (its DP controller
learns of a failure only from a scheduler's SIGQUIT). So every TP rank of an sglang-fx model runs
one daemon thread that waits in a barrier with its peers on a gloo group of its own, round after
round: a peer process that dies closes its connections, the barrier fails at once, and the rank
does what SGLang's own scheduler does on an exception (`run_scheduler_process`): it logs the
error, sends SIGQUIT to its parent process, and exits. SGLang's watchdogs then end the server.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds between barriers, and how long one may wait on a live but busy peer (a peer whose
#: process is gone fails the barrier at once; this bounds a peer that hangs while alive).
PERIOD, TIMEOUT = 1.0, 600.0
#: Seconds between noticing a lost peer and acting: when SGLang shuts the server down it ends
#: every scheduler within that time, and a rank that saw its peer go first must not report a crash.
GRACE = 3.0


def watch(ranks: list[int], name: str) -> threading.Thread:
    """Start watching the TP group of global `ranks` (every member calls this, in step: the gloo
    group is made collectively). Returns the daemon thread."""
    import torch.distributed as dist

    group = dist.new_group(ranks, backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    thread = threading.Thread(target=_loop, args=(group, name), name="sglang-fx-peer-watch", daemon=True)
    thread.start()
    return thread


def _loop(group: Any, name: str) -> None:
    import torch.distributed as dist

    try:
        while True:
            dist.barrier(group=group)
            time.sleep(PERIOD)
    except Exception as e:  # a peer is gone (or hangs past TIMEOUT)
        time.sleep(GRACE)  # still alive: not a shutdown
        logger.error("sglang-fx: a peer of TP group %s is gone (%s: %s); ending this scheduler",
                     name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")  # fmt: skip
        os.kill(os.getppid(), signal.SIGQUIT)  # as SGLang's scheduler does on an exception
        os._exit(1)
