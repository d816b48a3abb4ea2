"""Process-wide JAX settings the backend needs, applied once before its first JAX work.

- `jax_enable_x64`: without it JAX turns every int64 array into an int32 copy, so the int64
  tensors of the SPI (positions, slots) could not cross zero-copy. The model code names every
  dtype it computes in, so nothing silently widens to float64.
- JAX's persistent compilation cache, so a restarted server loads its compiled shape buckets in
  about 0.1 s each instead of compiling them again (seconds each). Directory: the `compile_cache`
  option, default `<sglang-fx cache>/jax` (`sglang_fx.models.cache_root`); "none" turns it off.
  JAX keys each entry by the program, its shapes, the jax/jaxlib versions and the device, so a
  stale entry is never used. Bounded to `CACHE_MAX_BYTES` (least recently used entries go
  first) unless JAX_COMPILATION_CACHE_MAX_SIZE says otherwise; a SmolLM2 program takes about
  0.3 MB.

The settings are JAX's process-wide configuration; a process that runs the backend runs no other
JAX code that would want them otherwise (SGLang's own processes use none).
"""

from __future__ import annotations

import os
from pathlib import Path

from sglang_fx.errors import UnsupportedConfigError

CACHE_MAX_BYTES = 2 << 30
_cache_dir: str | None = None  # the persistent cache directory set in this process ("" = off)


def configure() -> None:
    """Settings every use of the backend needs (idempotent)."""
    import jax

    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


def use_compile_cache(option: str | None) -> str | None:
    """Point JAX's persistent compilation cache at the `compile_cache` option's directory (None:
    the default one; "none": off). Returns the directory in use, or None when off. A process
    keeps the first choice: JAX reads the directory once."""
    global _cache_dir
    import jax

    if option is not None and option.strip().lower() == "none":
        wanted = ""
    else:
        from sglang_fx.models import cache_root

        wanted = str(Path(option).expanduser() if option else cache_root() / "jax")
    if _cache_dir is None:
        if wanted:
            try:
                os.makedirs(wanted, exist_ok=True)
            except OSError as e:
                raise UnsupportedConfigError(f"jax backend: compile_cache {wanted!r} cannot be created ({e}); "
                                             "pass a writable directory, or compile_cache=none") from None  # fmt: skip
            jax.config.update("jax_compilation_cache_dir", wanted)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default: unbounded
                jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
        _cache_dir = wanted
    elif _cache_dir != wanted:
        raise UnsupportedConfigError(f"jax backend: this process already uses compile_cache {_cache_dir or 'none'!r}; "
                                     f"one process uses one (asked for {wanted or 'none'!r})")  # fmt: skip
    return _cache_dir or None


def check_device(device: str) -> None:
    """Only the CPU is supported (`CAPABILITIES.dtypes`); anything else is refused by name. Does
    not initialise JAX's backends (a multi-process run initialises jax.distributed first)."""
    if device.partition(":")[0] != "cpu":
        raise UnsupportedConfigError(f"jax backend: device {device!r} is not supported; it runs on cpu")
