"""The SGLang adapter: run SGLang (0.5.23) models through sglang-fx backends.

- `plugin.register` is the `sglang.srt.plugins` entry point: `--model-impl NAME` selects the
  installed sglang-fx backend NAME.
- `model.SglangFxForCausalLM` is the torch module SGLang's ModelRunner calls.
- `compat` holds every SGLang-version-sensitive lookup.
- `launch_server` is `python -m sglang.launch_server` with the CPU environment set.
- `backend_options` reads SGLANG_FX_OPTIONS: the backends' own options (`RunnerOptions.extra`)
  for SGLang users, checked at start-up against what each backend declares.
- `draft_backend` reads the one route that picks the backend of a speculative draft model
  (SGLang has no flag for it): SGLANG_FX_OPTIONS' "draft" entry, e.g.
  '{"draft": {"backend": "numpy"}}'; without it the draft runs on the target's backend.

On a CPU-only host SGLang needs SGLANG_USE_CPU_ENGINE=1 in the environment *before* it is
imported (it decides its device path at import time, in every process). `use_cpu_engine()`
sets it for Engine scripts; `python -m sglang_fx.sglang.launch_server ... --device cpu` sets it
for the server. Importing this package does not import SGLang.
"""

from __future__ import annotations

import json
import os
import sys

CPU_ENGINE_ENV = "SGLANG_USE_CPU_ENGINE"

#: Backend options for SGLang runs: a JSON object {backend name: {option: value}} (values are
#: strings), e.g. '{"mindspore": {"decode_batches": "1,2,4,8"}}'. Read in the launcher (checked
#: against each backend's declared Capabilities.options) and in every scheduler.
OPTIONS_ENV = "SGLANG_FX_OPTIONS"


def backend_options(backend: str) -> dict[str, str]:
    """The options SGLANG_FX_OPTIONS gives `backend` ({} when unset or naming it not). Raises
    UnsupportedConfigError naming the variable and the expected form when it is malformed."""
    from ..errors import UnsupportedConfigError

    text = os.environ.get(OPTIONS_ENV, "").strip()
    if not text:
        return {}
    example = '\'{"mindspore": {"decode_batches": "1,2,4,8"}}\''
    try:
        table = json.loads(text)
    except json.JSONDecodeError as e:
        raise UnsupportedConfigError(f"{OPTIONS_ENV} is not valid JSON ({e}); expected e.g. {example}") from None
    if not isinstance(table, dict) or not all(
        isinstance(opts, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in opts.items())
        for opts in table.values()
    ):
        raise UnsupportedConfigError(f"{OPTIONS_ENV} must map backend names to objects of string options, e.g. {example}; got {text!r}")
    return dict(table.get(backend, {}))


#: The SGLANG_FX_OPTIONS entry that is not a backend's options but the draft model's route:
#: {"draft": {"backend": NAME}} runs a speculative draft model (--speculative-draft-model-path)
#: on the sglang-fx backend NAME; the target runs on --model-impl. Validated at start-up.
DRAFT_ENTRY = "draft"


def draft_backend(target: str) -> str:
    """The sglang-fx backend that serves the speculative draft model when --model-impl is
    `target`: SGLANG_FX_OPTIONS' {"draft": {"backend": NAME}}, else `target`. Raises
    UnsupportedConfigError when the entry holds anything but a "backend" name. Whether NAME is an
    installed, available backend that can run the draft is checked by the plugin at start-up."""
    from ..errors import UnsupportedConfigError

    entry = backend_options(DRAFT_ENTRY)
    unknown = sorted(set(entry) - {"backend"})
    if unknown:
        raise UnsupportedConfigError(f"{OPTIONS_ENV}'s {DRAFT_ENTRY!r} entry takes only \"backend\" (the draft model's "
                                     f"sglang-fx backend), not {unknown}; e.g. '{{\"draft\": {{\"backend\": \"numpy\"}}}}'")  # fmt: skip
    return entry.get("backend") or target


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
