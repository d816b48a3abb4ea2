"""The SGLang adapter: run SGLang (0.5.23) models through sglang-fx backends.

- `plugin.register` is the `sglang.srt.plugins` entry point: `--model-impl NAME` selects the
  installed sglang-fx backend NAME.
- `model.SglangFxForCausalLM` is the torch module SGLang's ModelRunner calls.
- `compat` holds every SGLang-version-sensitive lookup.
- `launch_server` is `python -m sglang.launch_server` with the CPU environment set.

On a CPU-only host SGLang needs SGLANG_USE_CPU_ENGINE=1 in the environment *before* it is
imported (it decides its device path at import time, in every process). `use_cpu_engine()`
sets it for Engine scripts; `python -m sglang_fx.sglang.launch_server ... --device cpu` sets it
for the server. Importing this package does not import SGLang.
"""

from __future__ import annotations

import os
import sys

CPU_ENGINE_ENV = "SGLANG_USE_CPU_ENGINE"


def use_cpu_engine() -> None:
    """Make SGLang (imported after this call, here and in its subprocesses) take its CPU path.
    Raises RuntimeError if SGLang's runtime was already imported without it."""
    if os.environ.get(CPU_ENGINE_ENV) == "1":
        return
    if "sglang.srt.utils.common" in sys.modules:
        raise RuntimeError(
            f"SGLang was imported before {CPU_ENGINE_ENV}=1 was set, so it chose its CUDA path; call "
            "sglang_fx.sglang.use_cpu_engine() before importing sglang, or export "
            f"{CPU_ENGINE_ENV}=1 in the environment"
        )
    os.environ[CPU_ENGINE_ENV] = "1"
