"""`python -m sglang_fx.sglang.bench_one_batch ARGS`: SGLang's latency benchmark
`python -m sglang.benchmark.one_batch ARGS` (formerly `sglang.bench_one_batch`), able to run
sglang-fx backends (`--model-impl mindspore`, ...). Same arguments, same tables.

SGLang's one_batch builds its ModelRunner itself and, unlike the launcher and the Engine,
never loads SGLang's general plugins nor validates its server arguments. Left alone, under it
`--model-impl mindspore` picks SGLang's own Ascend-only wrapper (NameError: name 'ms' is not
defined off Ascend), and any other sglang-fx name, or a misspelt one, silently benchmarks
SGLang's native model. Where sglang-fx is installed, its start-up import hook (cpu_host) has
SGLang's own one_batch load the plugins before its ModelRunner is built
(`load_plugins_with_the_model_runner`, below), so `python -m sglang.benchmark.one_batch
--model-impl mindspore ...` runs the sglang-fx backend, in every rank. This entry point does
that and more:
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


# --------------------------------------------------------------------------------------------
# SGLang's own one_batch: `python -m sglang.benchmark.one_batch ... --model-impl mindspore`
# --------------------------------------------------------------------------------------------


def is_sglang_one_batch() -> bool:
    """Whether this process runs SGLang's own one_batch: its main module (`__main__`; in a rank
    one_batch spawned, `__mp_main__`, which multiprocessing runs from the same module) is one of
    compat.ONE_BATCH_MODULES. This entry point's processes answer False: they load the plugins
    themselves."""
    from .compat import ONE_BATCH_MODULES

    for main in ("__main__", "__mp_main__"):
        spec = getattr(sys.modules.get(main), "__spec__", None)
        if spec is not None and spec.name in ONE_BATCH_MODULES:
            return True
    return False


def load_plugins_with_the_model_runner(model_runner_module: Any) -> None:
    """Run by the start-up import hook (sglang_fx.cpu_host) right after SGLang's ModelRunner
    module is imported in SGLang's own one_batch (`is_sglang_one_batch`), in the launching
    process and in every tensor-parallel rank it spawns: registers, through SGLang's
    HookRegistry, `load_sglang_plugins` to run before ModelRunner.__init__. So the plugins load
    where the launcher and the Engine would have loaded them, before the model is resolved, and
    not in the middle of one_batch's imports (where applying hooks would import SGLang modules
    whose importers are half-initialised). Only the plugins: one_batch still validates no server
    arguments, so a misspelt --model-impl is not refused as `python -m sglang_fx.sglang.bench_one_batch`
    refuses it, and CPU ranks need SGLang's SGLANG_CPU_OMP_THREADS_BIND as for native models."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from .compat import MODEL_RUNNER_INIT

    HookRegistry.register(MODEL_RUNNER_INIT, load_sglang_plugins, HookType.BEFORE)
    HookRegistry.apply_hooks()


def load_sglang_plugins(*args: Any, **kwargs: Any) -> None:
    """SGLang's load_plugins() (idempotent), as a BEFORE hook: the arguments pass unchanged."""
    from sglang.srt.plugins import load_plugins

    load_plugins()


if __name__ == "__main__":
    main()
