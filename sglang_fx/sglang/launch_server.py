"""`python -m sglang_fx.sglang.launch_server ARGS`: SGLang's `python -m sglang.launch_server
ARGS`, with SGLANG_USE_CPU_ENGINE=1 set first when the server runs on the CPU (`--device cpu`).
Everything else is SGLang's launcher."""

from __future__ import annotations

import runpy
import sys


def wants_cpu(argv: list[str]) -> bool:
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1] == "cpu"
        if arg.startswith("--device="):
            return arg.split("=", 1)[1] == "cpu"
    return False


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_cpu(argv):
        from . import use_cpu_engine

        use_cpu_engine()
    sys.argv = ["sglang.launch_server", *argv]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
