"""Process helpers shared by the benchmarks: the resident memory of a process tree, sampled in a
thread, and ending whatever processes a benchmark has left behind."""

from __future__ import annotations

import contextlib
import os
import threading


class Memory:
    """Samples the summed RSS of a process tree every `period` s in a thread: the process `pid`
    and all its descendants, or with include_root=False its descendants only (an in-process
    sglang.Engine's scheduler and detokenizer, without the benchmark itself). `peak()` since the
    last `reset()` (or the start); `stop()` ends the sampling and returns the peak."""

    def __init__(self, pid: int, period: float = 0.5, include_root: bool = True):
        import psutil

        self.root, self.period, self.include_root, self._peak = psutil.Process(pid), period, include_root, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self.root] * self.include_root + self.root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            with contextlib.suppress(Exception):
                self._peak = max(self._peak, self._sample())

    def reset(self) -> None:
        self._peak = self._sample()

    def peak(self) -> int:
        return self._peak

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self._peak


def end_children(grace: float = 20.0) -> list[int]:
    """SIGTERM every descendant of this process still running (an engine whose shutdown did not
    happen: a start-up that failed half way, an exception), SIGKILL those left after `grace` s.
    Returns the pids that had to be ended (empty when everything had stopped already)."""
    import psutil

    left = psutil.Process(os.getpid()).children(recursive=True)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(left, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    return [p.pid for p in left]
