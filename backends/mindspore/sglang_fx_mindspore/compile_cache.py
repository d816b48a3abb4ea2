"""A persistent compile cache for the precompiled graphs, over MindSpore's own.

MindSpore 2.10 keeps compiled graphs when MS_COMPILER_CACHE_ENABLE=1, in
`MS_COMPILER_CACHE_PATH/rank_<RANK_ID>/graph_cache/compile_cache_<N>.mindir`, and gives a
process's N-th compile the N-th cached graph. It checks only a hash of the entry script and the
modules that script imports directly, not the graph's shapes nor this backend's code (loaded
through an entry point), so a cache written by other code, another model or another compile
order is loaded all the same, with wrong shapes or weights. Hence this wrapper:
- each cache lives in a directory of its own, named by a hash of everything the graphs depend
  on: this backend's sources, the MindSpore version, the entry script, and the caller's key
  (model spec, KV layout, mode, device, graph list in compile order, tensor-parallel rank);
- it is switched on only around the precompile, whose graphs compile in a fixed order, and off
  right after, so no graph compiled later (on first use) reads or writes it;
- an exclusive file lock keeps two processes from writing one directory at once;
- the entry script must be a file: MindSpore hashes it, and under `python -c` every compile fails
  while the cache is on ("FileNotFoundError: .../-c"), so then the cache is skipped with a warning.
The weights of a loaded graph come from the Parameters registered on the Decoder Cell, by name
(`Decoder.registered`), which is why the runner jits the Cell's own construct.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import mindspore as ms
from sglang_fx.errors import UnsupportedConfigError

logger = logging.getLogger(__name__)

ENABLE, PATH = "MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH"


def refuse_process_wide_cache() -> None:
    """Raise UnsupportedConfigError when MindSpore's cache is switched on for the whole process
    (ENABLE, or the older set_context(enable_compile_cache=True)): it would hand graphs to
    whatever compiles in the same order (measured: a warm cache decoded token 0 at every step)."""
    value = os.environ.get(ENABLE, "").strip().lower()
    if value not in ("", "0", "false", "off", "no") or ms.get_context("enable_compile_cache"):
        setting = f"{ENABLE}={os.environ[ENABLE]}" if value else "set_context(enable_compile_cache=True)"
        raise UnsupportedConfigError(
            f"mindspore backend: {setting} is set, and MindSpore 2.10's compile "
            "cache, switched on for the whole process, gives this backend's graphs wrong weights when it loads them "
            "(every token 0); unset it and use the backend options precompile and compile_cache, which use it safely "
            '(e.g. SGLANG_FX_OPTIONS=\'{"mindspore": {"precompile": "all", "compile_cache": "~/.cache/sglang-fx/mindspore"}}\')'
        )


def key_hash(key: Any) -> str:
    """The directory name for `key`: sha256 of it, this package's sources, MindSpore's version
    and the entry script's path."""
    digest = hashlib.sha256(repr(key).encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(ms.__version__.encode() + os.path.realpath(sys.argv[0]).encode())
    return digest.hexdigest()[:24]


class CompileCache:
    """`with CompileCache(root, key):` compiles in it write to, or load from, the cache for key.
    `state` is "warm" when the directory held graphs before, "cold" when it is being filled, or
    "off" when the entry script is not a file."""

    def __init__(self, root: str | os.PathLike, key: Any):
        self.dir = Path(root).expanduser() / key_hash(key)
        self.state = "off"
        self._lock = None

    def __enter__(self) -> CompileCache:
        if not os.path.isfile(sys.argv[0]):
            logger.warning("sglang-fx mindspore: compile cache off: MindSpore's cache needs the program to be a file "
                           "(not python -c or a REPL); compiling as usual")  # fmt: skip
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir.with_name(self.dir.name + ".lock"), "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.state = "warm" if any(self.dir.rglob("*.mindir")) else "cold"
        os.environ[PATH], os.environ[ENABLE] = str(self.dir), "1"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            os.environ[ENABLE] = "0"  # graphs compiled from now on neither read nor write the cache
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
