"""The SGLang general plugin (entry point group `sglang.srt.plugins`): makes
`--model-impl NAME` run the installed sglang-fx backend NAME.

SGLang calls `register()` in its launcher, its Engine and every scheduler process, before
server arguments are validated and before the model loads. It registers two HookRegistry
hooks (SGLang applies them right after):

- AROUND `check_server_args` (launcher): refuses an unknown --model-impl with the list of
  valid names, checks (in a child process, so that the launcher imports no model framework) an
  sglang-fx backend's availability and capabilities (device, dtype, architecture, page
  size, tp/ep sizes), the SGLang features they do not run yet (speculative decoding, LoRA) and
  whether the model splits tp_size ways, so an unsupported configuration
  fails at start-up with every problem named, and, for "mindspore", answers SGLang's NPU-only
  rule with that capability check. On a CPU host it also sets SGLANG_CPU_OMP_THREADS_BIND
  when several schedulers need it and the user has not (`bind_cpu_threads`), and, with
  --disaggregation-mode prefill|decode, checks and completes the PD settings a CPU host needs
  (`prepare_disaggregation`, see sglang_fx/sglang/pd.py). On CPU it runs sglang-fx backends
  under SGLang's plain scheduler loop (`synchronous_schedule`).
- AROUND `get_model_architecture` (every process): for an sglang-fx name, resolves the model
  class to the adapter (`sglang_fx.sglang.model`) instead of SGLang's own.
- AROUND `TokenizerManager._validate_one_request` (the HTTP server's process): refuses a
  prompt of no tokens with a 400. SGLang 0.5.23 lets it through, and its scheduler then dies
  on the empty step (native models as well as ours: "cannot reshape tensor of 0 elements"),
  taking every request in flight with it. Applied for every --model-impl, since all crash.
- AROUND `DraftBackendFactory.create_decode_backend` / `create_draft_extend_backend` (the
  scheduler, with a draft model): for an sglang-fx draft model, the draft steps' attention
  backends SGLang cannot build on CPU are not needed (sglang_fx/sglang/draft.py).
- AROUND `model_loader.loader._get_quantization_config` (every process), named
  `serve_quantized_at_any_dtype` (sglang_fx/sglang/quantization.py): for an sglang-fx name,
  SGLang builds no quantization config (nor refuses a W8A8 checkpoint at --dtype float32);
  sglang-fx reads the scheme itself and the backend's declared schemes decide.

Backend names equal to SGLang's own implementations (auto, sglang, transformers) are refused:
they stay SGLang's. "mindspore" is SGLang's name for its Ascend-only external wrapper; when the
sglang-fx mindspore backend is installed, the name means that backend.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import sharding
from ..checkpoint import load_spec
from ..errors import SglangFxError, UnsupportedConfigError
from ..registry import default_registry
from . import DRAFT_ENTRY, OPTIONS_ENV, backend_options, compat, draft, draft_backend
from .quantization import serve_quantized_at_any_dtype

logger = logging.getLogger(__name__)

#: SGLang's own implementations: never taken over by a backend of the same name.
RESERVED = frozenset({"auto", "sglang", "transformers"})

_backends: list[str] = []  # the names this plugin serves in this process (set by register)


def backend_names() -> list[str]:
    """Installed sglang-fx backends that --model-impl can name (entry-point metadata only)."""
    names = []
    for name in default_registry().names():
        if name in RESERVED:
            entries = ", ".join(e.distribution for e in default_registry().entries(name))
            logger.error(
                "sglang-fx: backend %r (from %s) is not usable as --model-impl: the name is SGLang's "
                "own implementation. Rename the backend's entry point.", name, entries)
            continue
        if name == DRAFT_ENTRY:
            logger.error("sglang-fx: backend %r is not usable as --model-impl: %s' %r key is the draft model's route. "
                         "Rename the backend's entry point.", name, OPTIONS_ENV, DRAFT_ENTRY)  # fmt: skip
            continue
        names.append(name)
    return names


def register() -> None:
    """Entry point of the `sglang.srt.plugins` group."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    compat.warn_if_untested()
    _backends[:] = backend_names()
    HookRegistry.register(compat.CHECK_SERVER_ARGS, check_server_args, HookType.AROUND)
    HookRegistry.register(compat.GET_MODEL_ARCHITECTURE, get_model_architecture, HookType.AROUND)
    HookRegistry.register(compat.VALIDATE_REQUEST, refuse_empty_prompt, HookType.AROUND)
    HookRegistry.register(compat.GET_QUANT_CONFIG, serve_quantized_at_any_dtype, HookType.AROUND)
    HookRegistry.register(compat.DRAFT_DECODE_BACKEND, draft.create_decode_backend, HookType.AROUND)
    HookRegistry.register(compat.DRAFT_EXTEND_BACKEND, draft.create_draft_extend_backend, HookType.AROUND)
    logger.info("sglang-fx: --model-impl can name the backends %s", ", ".join(_backends) or "(none installed)")


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


def check_server_args(original, server_args: Any, *args: Any, **kwargs: Any):
    bind_cpu_threads(server_args)
    name = compat.impl_name(compat.server_view(server_args).model_impl)
    prepare_disaggregation(name, server_args)
    if name not in _backends:
        valid = sorted(compat.sglang_model_impls() | set(_backends))
        if name not in compat.sglang_model_impls():
            raise ValueError(
                f"--model-impl {name!r} is neither an SGLang implementation nor an installed sglang-fx "
                f"backend; valid values: {', '.join(valid)}. (`sglang-fx backends` lists the backends; "
                "install the package that provides one.)"
            )
        return original(server_args, *args, **kwargs)
    check_backend(name, server_args)
    if synchronous_schedule(compat.server_view(server_args)):
        compat.declare_server_args(server_args, "sglang_fx.schedule", disable_overlap_schedule=True)
        logger.info("sglang-fx: --disable-overlap-schedule on CPU (a step runs on the scheduler's thread: the overlap loop "
                    "would only hand out its tokens one step later)")  # fmt: skip
    if name in compat.sglang_model_impls():  # "mindspore": SGLang asserts an NPU for its own wrapper
        with compat.npu_rule_answered():
            return original(server_args, *args, **kwargs)
    return original(server_args, *args, **kwargs)


def bind_cpu_threads(server_args: Any) -> None:
    """On a CPU host, give SGLang's schedulers the CPU sets it asserts exist when there are more
    schedulers than NUMA nodes (tp_size 2 on one node: "SGLANG_CPU_OMP_THREADS_BIND is not
    set"), and skip SGLang's 60 s wait for CUDA core dumps after a crash. Runs in the launcher
    before any scheduler is spawned, for every --model-impl; the schedulers inherit the
    variables. Values the user set are kept."""
    import os

    view = compat.server_view(server_args)
    if str(getattr(view, "device", None) or "cpu") != "cpu":
        return
    value = compat.cpu_threads_binding(view)
    if value is not None:
        os.environ[compat.CPU_THREADS_BIND_ENV] = value
        logger.info("sglang-fx: %s=%s (one CPU set per scheduler; set it yourself to choose)", compat.CPU_THREADS_BIND_ENV, value)
    # There is no CUDA here: don't wait for CUDA core dumps after a crash (SGLang waits 60 s).
    os.environ.setdefault(compat.CUDA_COREDUMP_ENV, "0")


def synchronous_schedule(view: Any) -> bool:
    """Whether an sglang-fx backend's server should run SGLang's plain scheduler loop
    (--disable-overlap-schedule): on a CPU device, unless the user chose it already, with neither
    speculative decoding (SGLang's v2 workers are written for the overlap loop) nor PD
    disaggregation (`pd.configure` decides there). The overlap loop launches step k + 1 before it
    hands out step k's tokens, which pays where a launch returns at once (CUDA streams); on CPU
    the step runs to its end inside the launch, on the scheduler's thread, so overlap only holds
    every step's tokens back by one more step: a prefill's first token also waits for the prefill
    after it. Nothing runs alongside a step there, so throughput does not change."""
    return (str(getattr(view, "device", None) or "cpu") == "cpu" and not view.disable_overlap_schedule
            and not getattr(view, "speculative_algorithm", None)
            and str(getattr(view, "disaggregation_mode", None) or "null") == "null")  # fmt: skip


def prepare_disaggregation(name: str, server_args: Any) -> None:
    """PD disaggregation (--disaggregation-mode prefill|decode), for every --model-impl: refuses
    what cannot run and applies what a CPU host needs (sglang_fx/sglang/pd.py). Nothing outside
    PD mode."""
    from . import pd

    pd.configure(server_args, sglang_fx_backend=name in _backends)


def check_backend(name: str, server_args: Any) -> None:
    """Check that the backend is available and can run this model here, without importing its
    framework into this process; raises ValueError naming every problem (SGLang shows it as the
    start-up error)."""
    view = compat.server_view(server_args)
    try:
        # In a child process: the launcher never runs the model, and importing the framework
        # here would only add to its memory (MindSpore: about 330 MB).
        capabilities = default_registry().available_info(name, isolated=True).capabilities
        model_config = compat.server_model_config(server_args)
        archs = list(getattr(model_config.hf_config, "architectures", None) or [])
        dtype = str(model_config.dtype).removeprefix("torch.")
        device = str(view.device or "cpu")
        tp, ep = int(view.tp_size or 1), int(getattr(view, "ep_size", 1) or 1)
        path = compat.model_path(model_config.hf_config) or getattr(view, "model_path", None)
        try:  # config.json only: the quantization scheme, and the sizes sharding needs
            spec, spec_error = (load_spec(path) if path else None), None
        except SglangFxError as e:  # an unsupported architecture is named by validate below
            spec, spec_error = None, e
        problems = capabilities.validate(
            architecture=archs[0] if archs else None, dtype=dtype, device=device, page_size=view.page_size,
            tp_size=tp, ep_size=ep, options=backend_options(name), quantization=spec.quant.scheme if spec and spec.quant else None,
        )
        problems += compat.parallel_problems(view) + compat.feature_problems(view, capabilities)
        if spec is not None and spec.eagle3 is not None:
            problems.append(f"{path} is an EAGLE3 draft (LlamaForCausalLMEagle3), not a model to serve: give it as "
                            "--speculative-draft-model-path with --speculative-algorithm EAGLE3, and its target as --model-path")  # fmt: skip
        if not problems and getattr(view, "speculative_draft_model_path", None):
            problems += draft_problems(name, view, dtype, device, target_spec=spec)
        if spec_error is not None and not problems:
            raise spec_error
        if not problems and (tp > 1 or ep > 1):
            problems += sharding.problems(spec, tp, ep)
        # SGLang skips CUDA-graph capture for "mindspore" only (cuda_graph_setup.py:729); the
        # adapter's step is not capturable (host-side lengths, per-step metadata).
        if device.startswith("cuda") and name not in compat.sglang_model_impls() and not view.disable_cuda_graph \
                and "cuda_graph" not in capabilities.features:
            problems.append("CUDA graph capture is not supported by sglang-fx backends; add --disable-cuda-graph")
        if problems:
            raise UnsupportedConfigError("; ".join(problems))
    except SglangFxError as e:
        raise ValueError(f"--model-impl {name}: sglang-fx backend {name!r} cannot serve this: {e}") from e


def draft_problems(target: str, view: Any, dtype: str, device: str, target_spec: Any = None) -> list[str]:
    """What stops the draft model (--speculative-draft-model-path) from running on the backend
    its route names (`draft_backend`: SGLANG_FX_OPTIONS' "draft" entry, else the target's
    backend): an unknown or unavailable backend, or one whose Capabilities refuse the draft
    checkpoint (architecture, dtype, device, page size, the target's tp/ep sizes, which the
    draft runs under; an EAGLE3 draft needs Capabilities.eagle3). With EAGLE3 the draft must be
    an EAGLE3 checkpoint (and only there), made for the target (`target_spec`, its ModelSpec when
    known): the same vocabulary, its target_hidden_size, aux layers the target has. [] when it can run."""
    name = draft_backend(target)
    if name not in _backends:
        return [f"the draft model's backend {name!r} ({OPTIONS_ENV} {{\"draft\": {{\"backend\": ...}}}}) is not an installed "
                f"sglang-fx backend; accepted: {', '.join(sorted(_backends))} (default: the target's, {target!r})"]  # fmt: skip
    try:
        capabilities = default_registry().available_info(name, isolated=True).capabilities
        spec = load_spec(view.speculative_draft_model_path)
    except SglangFxError as e:
        return [f"the draft model cannot run on backend {name!r}: {e}"]
    problems = capabilities.validate(architecture=spec.architecture, dtype=dtype, device=device, page_size=view.page_size,
                                     tp_size=int(getattr(view, "tp_size", 1) or 1), ep_size=int(getattr(view, "ep_size", 1) or 1),
                                     options=backend_options(name), eagle3=spec.eagle3 is not None)  # fmt: skip
    problems = [f"the draft model on backend {name!r}: {p}" for p in problems]
    return problems + eagle3_draft_problems(view, spec, target_spec)


def eagle3_draft_problems(view: Any, draft: Any, target: Any = None) -> list[str]:
    """An EAGLE3 draft checkpoint where the algorithm wants one and nowhere else, and one that
    fits its target (ModelSpecs; target None: not checked)."""
    algorithm = str(getattr(view, "speculative_algorithm", "") or "").upper()
    path = view.speculative_draft_model_path
    if algorithm == "EAGLE3" and draft.eagle3 is None:
        return [f"--speculative-algorithm EAGLE3 needs an EAGLE3 draft (architecture LlamaForCausalLMEagle3); "
                f"{path} is a {draft.architecture}: give an EAGLE3 draft, or use --speculative-algorithm STANDALONE"]  # fmt: skip
    if algorithm != "EAGLE3" and draft.eagle3 is not None:
        return [f"{path} is an EAGLE3 draft (LlamaForCausalLMEagle3), which needs the target's hidden states: use "
                f"--speculative-algorithm EAGLE3, not {algorithm}"]  # fmt: skip
    if draft.eagle3 is None or target is None:
        return []
    from ..eagle3 import capture_layers

    e, out = draft.eagle3, []
    if draft.vocab_size != target.vocab_size:
        out.append(f"the EAGLE3 draft {path} has a vocabulary of {draft.vocab_size} and the target {target.vocab_size}: "
                   "is it the draft of this target?")  # fmt: skip
    if e.target_hidden_size != target.hidden_size:
        out.append(f"the EAGLE3 draft {path} reads hidden states {e.target_hidden_size} wide (target_hidden_size) and the "
                   f"target's are {target.hidden_size}: is it the draft of this target?")  # fmt: skip
    try:
        layers = capture_layers(target.num_layers, e.aux_layer_ids)
    except ValueError as err:
        out.append(f"the EAGLE3 draft {path} reads the target layers {list(e.aux_layer_ids or ())} and the target has "
                   f"{target.num_layers}: {err}")  # fmt: skip
    else:
        if len(layers) != e.num_aux:
            out.append(f"the EAGLE3 draft {path} projects {e.num_aux} captured layers (fc) and its config names the target "
                       f"layers {list(layers)}; the two must agree")  # fmt: skip
    return out


def refuse_empty_prompt(original, manager: Any, obj: Any, input_ids: Any, *args: Any, **kwargs: Any):
    if input_ids is not None and len(input_ids) == 0 and getattr(obj, "input_embeds", None) is None:
        raise ValueError("The input is empty (0 tokens): send a prompt of at least one token "
                         "(`text` that the tokenizer turns into tokens, or non-empty `input_ids`).")  # fmt: skip
    return original(manager, obj, input_ids, *args, **kwargs)


def get_model_architecture(original, model_config: Any, *args: Any, **kwargs: Any):
    name = compat.impl_name(model_config.model_impl)
    if name not in _backends:
        return original(model_config, *args, **kwargs)
    from .model import model_class

    draft = bool(getattr(model_config, "is_draft_model", False))
    if draft:  # a speculative draft model: its own route
        name = draft_backend(name)
    cls = model_class(name, draft)
    compat.set_resolved_architecture(model_config, cls.__name__, compat.resolved_model_impl(name))
    return cls, cls.__name__
