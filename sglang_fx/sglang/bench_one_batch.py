"""`python -m sglang_fx.sglang.bench_one_batch ARGS`: SGLang's latency benchmark
`python -m sglang.benchmark.one_batch ARGS` (formerly `sglang.bench_one_batch`), able to run
sglang-fx backends (`--model-impl mindspore`, ...). Same arguments, same tables.

SGLang's one_batch builds its ModelRunner itself and, unlike the launcher and the Engine,
never loads SGLang's general plugins nor validates its server arguments. So under it
`--model-impl mindspore` picks SGLang's own Ascend-only wrapper (NameError: name 'ms' is not
defined off Ascend), and any other sglang-fx name, or a misspelt one, silently benchmarks
SGLang's native model. This entry point:
- sets SGLANG_USE_CPU_ENGINE=1 first for `--device cpu`;
- loads SGLang's general plugins (sglang-fx's among them) in this process and in every
  tensor-parallel rank one_batch spawns (`latency_test` / `correctness_test` are replaced by
  module-level wrappers, which a spawned rank imports by name);
- runs `ServerArgs.check_server_args()` where the Engine does, so the plugin's start-up checks
  (unknown --model-impl, the backend's capabilities, CPU thread binding) apply.
Everything else is SGLang's one_batch.
"""

from __future__ import annotations

import sys
from typing import Any

from .launch_server import wants_cpu

#: one_batch's functions that build a ModelRunner; each runs in the rank's own process.
RANK_FUNCTIONS = ("latency_test", "correctness_test")
_originals: dict[str, Any] = {}  # filled in the launching process only


def _plugins_then(name: str):
    def run(*args: Any, **kwargs: Any) -> Any:
        from sglang.benchmark import one_batch
        from sglang.srt.plugins import load_plugins

        load_plugins()
        # In the launching process one_batch's attribute is this wrapper; in a spawned rank it
        # is still SGLang's function.
        return _originals.get(name, getattr(one_batch, name))(*args, **kwargs)

    run.__name__ = run.__qualname__ = name
    run.__module__ = __name__
    return run


latency_test = _plugins_then("latency_test")
correctness_test = _plugins_then("correctness_test")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_cpu(argv):
        from . import use_cpu_engine

        use_cpu_engine()
    from sglang.benchmark import one_batch
    from sglang.srt.plugins import load_plugins

    load_plugins()
    for name in RANK_FUNCTIONS:
        _originals[name] = getattr(one_batch, name)
        setattr(one_batch, name, globals()[name])
    set_envs_and_config = one_batch._set_envs_and_config

    def checked(server_args: Any) -> Any:  # one_batch.main calls it right after resolving the arguments
        server_args.check_server_args()
        return set_envs_and_config(server_args)

    one_batch._set_envs_and_config = checked
    sys.argv = ["sglang.benchmark.one_batch", *argv]
    one_batch.cli_main()


if __name__ == "__main__":
    main()
