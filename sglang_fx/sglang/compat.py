"""Every lookup into SGLang internals that may move between SGLang versions, in one place.

Pinned to SGLang 0.5.23 (`TESTED_VERSION`). When SGLang moves one of these, this is the only
file of sglang-fx to change. Line numbers below are those of 0.5.23.

- Where the KV pools live: `srt/model_executor/forward_context.py` getters
  (`get_token_to_kv_pool()`, `get_req_to_token_pool()`), valid inside a forward. The token
  pool (`srt/mem_cache/memory_pool.py::MHATokenToKVPool`) holds `k_buffer` / `v_buffer`: one
  [num_slots, num_kv_heads, head_dim] tensor per layer ("nhd" layout), slot 0 reserved; for
  MLA models `MLATokenToKVPool.kv_buffer` holds one [num_slots, 1, kv_lora_rank + rope] latent
  tensor per layer.
- How a model is resolved: `srt/model_loader/utils.py::get_model_architecture` (a
  HookRegistry target), which sets `_resolved_model_arch` / `_resolved_model_impl`.
- Server-argument validation: `srt/arg_groups/validation_hook.py::check_server_args`
  (a HookRegistry target) and its NPU-only rule for "mindspore" (line 318).
- The dtype and device a model is built for: SGLang's loader (`srt/model_loader/loader.py`)
  constructs model classes under `set_default_torch_dtype(model_config.dtype)` and
  `with target_device:`, so torch's defaults answer both.
- Input logprobs: `srt/layers/logits_processor.py::LogitsProcessor`, reused with an identity
  LM head over logits the backend computed (`BackendLogitsProcessor`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import logging
from typing import Any

import torch

from ..parallel import Group, Parallel, Rendezvous

logger = logging.getLogger(__name__)

TESTED_VERSION = "0.5.23"

#: HookRegistry targets (dotted paths) that the plugin wraps.
GET_MODEL_ARCHITECTURE = "sglang.srt.model_loader.utils.get_model_architecture"
CHECK_SERVER_ARGS = "sglang.srt.arg_groups.validation_hook.check_server_args"
#: Where the model loader turns config.json's quantization_config into SGLang's QuantizationConfig
#: (and refuses a --dtype the scheme's kernels do not take); see sglang_fx/sglang/quantization.py.
GET_QUANT_CONFIG = "sglang.srt.model_loader.loader._get_quantization_config"
#: Where the HTTP server's process checks each request's tokens before it goes to the scheduler;
#: a ValueError raised there becomes a 400 answer naming the problem.
VALIDATE_REQUEST = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
#: SGLang's ModelRunner constructor: under SGLang's own one_batch, which loads no plugins, the
#: plugins load right before it runs (sglang_fx/sglang/bench_one_batch.py; its module name is also
#: written in sglang_fx/cpu_host.py, which cannot import this file at start-up).
MODEL_RUNNER_INIT = "sglang.srt.model_executor.model_runner.ModelRunner.__init__"
#: The main modules of SGLang's latency tool (`python -m ...`): 0.5.23's and its former name.
ONE_BATCH_MODULES = ("sglang.benchmark.one_batch", "sglang.bench_one_batch")

#: Where SGLang's EAGLE v2 draft worker (also STANDALONE's) gets the attention backends of its draft
#: steps (speculative/draft_utils.py); see sglang_fx/sglang/draft.py.
DRAFT_DECODE_BACKEND = "sglang.srt.speculative.draft_utils.DraftBackendFactory.create_decode_backend"
DRAFT_EXTEND_BACKEND = "sglang.srt.speculative.draft_utils.DraftBackendFactory.create_draft_extend_backend"

#: The environment variable SGLang reads (at import time, in every process) to take its CPU
#: path (`srt/utils/common.py::is_cpu`).
CPU_ENGINE_ENV = "SGLANG_USE_CPU_ENGINE"

#: SGLang's switch for triggering and awaiting CUDA core dumps when a scheduler crashes
#: (`srt/managers/tokenizer_manager.py`: it then sleeps SGLANG_CUDA_COREDUMP_BEFORE_CRASH_WAIT_SECS, 60).
CUDA_COREDUMP_ENV = "SGLANG_CUDA_COREDUMP_BEFORE_CRASH"

#: The CPU sets of SGLang's schedulers on a CPU host, one "|"-separated entry per scheduler
#: (`srt/utils/numa_utils.py`); see `cpu_threads_binding`.
CPU_THREADS_BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"


def sglang_version() -> str | None:
    try:
        return md.version("sglang")
    except md.PackageNotFoundError:
        return None


def warn_if_untested() -> None:
    v = sglang_version()
    if v is not None and v != TESTED_VERSION:
        logger.warning(
            "sglang-fx's SGLang adapter is tested with sglang==%s, found %s; if the model fails "
            "to load or run, check sglang_fx/sglang/compat.py first", TESTED_VERSION, v)


def sglang_model_impls() -> frozenset[str]:
    """SGLang's own --model-impl values (srt/configs/model_config.py::ModelImpl)."""
    from sglang.srt.configs.model_config import ModelImpl

    return frozenset(m.value for m in ModelImpl)


def impl_name(value: Any) -> str:
    """A --model-impl value as a plain string (ModelConfig keeps a str or a ModelImpl)."""
    return str(getattr(value, "value", value))


def resolved_model_impl(name: str):
    """What SGLang records as `_resolved_model_impl` for an sglang-fx model: MINDSPORE for the
    name SGLang already knows (so its own mindspore-specific runner branches apply, e.g. no
    CUDA-graph capture), SGLANG otherwise (an SGLang-style model that owns its KV writes)."""
    from sglang.srt.configs.model_config import ModelImpl

    return ModelImpl.MINDSPORE if name == ModelImpl.MINDSPORE.value else ModelImpl.SGLANG


def set_resolved_architecture(model_config: Any, arch: str, impl: Any) -> None:
    """Record the resolution the way get_model_architecture does (model_loader/utils.py:233)."""
    setattr(model_config, "_resolved_model_arch", arch)
    setattr(model_config, "_resolved_model_impl", impl)


# --------------------------------------------------------------------------------------------
# Server arguments (launcher process, before the engine starts)
# --------------------------------------------------------------------------------------------


def server_view(server_args: Any) -> Any:
    """The resolved-so-far view of ServerArgs (arg_groups/model_override_base.py)."""
    from sglang.srt.arg_groups.overrides import resolving_view

    return resolving_view(server_args)


def server_model_config(server_args: Any) -> Any:
    """SGLang's ModelConfig for these arguments (memoised by SGLang)."""
    from sglang.srt.arg_groups.overrides import model_config_of

    return model_config_of(server_args)


def raw_server_args(server_args: Any) -> dict[str, Any]:
    """The ServerArgs fields as the user gave them, before SGLang's resolution pipeline changed
    any (`_raw_input`, recorded by arg_groups/pipeline.py:29); {} before resolution ran."""
    return dict(getattr(server_args, "_raw_input", None) or {})


def declare_server_args(server_args: Any, source: str, **fields: Any) -> None:
    """Set resolved ServerArgs fields the way SGLang's own handlers do (`declare_resolution`,
    arg_groups/overrides.py:110): the decision is recorded with its source, and projected onto
    the config every process reads when the launcher publishes it. Valid until then (i.e. in
    check_server_args, which runs after resolution and before publication)."""
    from sglang.srt.arg_groups.overrides import declare_resolution

    declare_resolution(server_args, source, **fields)


def npu_rule_answered():
    """SGLang 0.5.23 asserts `get_platform().is_npu` whenever --model-impl is "mindspore"
    (validation_hook.py:318): a rule for its built-in sgl_mindspore wrapper. When sglang-fx
    serves that name, the device rule is the backend's declared capabilities, checked before
    this is used; this scope answers the NPU question for SGLang's check only. In 0.5.23 no
    other reader of `is_npu` runs inside check_server_args (checked by hand)."""
    from sglang.srt.runtime_context import override_platform

    return override_platform(is_npu=True)


# --------------------------------------------------------------------------------------------
# Model construction (scheduler process)
# --------------------------------------------------------------------------------------------


def model_path(hf_config: Any, draft: bool = False) -> str:
    """Local directory of the checkpoint being loaded. SGLang's model config bag has the
    path it resolved (a hub id is downloaded to a local directory first); the HF config's
    `_name_or_path` is the fallback. A speculative draft model (`draft`) is not in that bag
    (it holds the target's): its HF config's `_name_or_path`, loaded by SGLang from the draft's
    directory, else --speculative-draft-model-path (`get_spec()`)."""
    named = str(getattr(hf_config, "_name_or_path", "") or getattr(hf_config, "name_or_path", ""))
    if draft:
        if named:
            return named
        from sglang.srt.runtime_context import get_spec

        return str(get_spec().speculative_draft_model_path)
    with contextlib.suppress(Exception):
        from sglang.srt.runtime_context import get_model

        path = get_model().model_path
        if path:
            return str(path)
    return named


def construction_dtype() -> torch.dtype:
    """The dtype SGLang builds the model in (its loader sets torch's default dtype)."""
    return torch.get_default_dtype()


def construction_device() -> str:
    """The device SGLang builds the model on, as "cpu" / "cuda:0" / "npu:0"."""
    dev = torch.get_default_device()
    if dev.type != "cpu" and dev.index is None:
        mod = getattr(torch, dev.type, None)
        index = mod.current_device() if mod is not None and hasattr(mod, "current_device") else 0
        dev = torch.device(dev.type, index)
    return str(dev)


def parallel_layout(device: str) -> Parallel:
    """This scheduler's place in SGLang's layout (`srt/runtime_context.py::get_parallel()`,
    published before the model is built): the TP GroupCoordinator (`unique_name` "tp:0",
    `ranks`, `rank_in_group`, `device_group`: gloo on CPU), moe_ep_size (experts split over the
    TP group; SGLang aliases its EP group to the TP group when they are as wide), dp_rank (None
    without a DP controller). The rendezvous for the backend's own collective library: TP rank 0
    picks a free port on its host (the --dist-init-addr host across nodes, else loopback) and
    broadcasts it over the TP group's CPU group, so every rank of this world (one DP replica)
    agrees and no port of SGLang's is reused. Collective: every TP rank calls it, at model
    construction. On NPU, Group.native is the torch_npu group's HCCL communicator, which
    SGLang's own MindSpore runner also hands to MindSpore (mindspore_runner.py::reuse_hccl_comm)."""
    from sglang.srt.runtime_context import get_parallel, get_server_args

    p, args = get_parallel(), get_server_args()
    group = p.tp_group
    dp_size = int(getattr(args, "dp_size", 1) or 1)
    if p.tp_size == 1:
        return Parallel(dp_size=dp_size, dp_rank=p.dp_rank or 0)
    import torch.distributed as dist

    host = str(p.dist_init_addr).rsplit(":", 1)[0] if (p.nnodes or 1) > 1 and p.dist_init_addr else "127.0.0.1"
    offer = [None]
    if group.rank_in_group == 0:
        from ..distributed import free_ports

        offer = [(host, free_ports(1)[0])]
    dist.broadcast_object_list(offer, src=group.ranks[0], group=group.cpu_group)
    native = hccl_communicator(group) if device.startswith("npu") else None
    return Parallel(
        tp=Group(group.unique_name, tuple(group.ranks), group.rank_in_group, torch_group=group.device_group, native=native),
        ep_size=int(p.moe_ep_size or 1),
        dp_size=dp_size,
        dp_rank=p.dp_rank or 0,
        rendezvous=Rendezvous(offer[0][0], offer[0][1], world_size=group.world_size, rank=group.rank_in_group),
    )


def hccl_communicator(group: Any) -> int:
    """The HCCL communicator handle of an SGLang GroupCoordinator on Ascend (torch_npu's process
    group backend), as SGLang's MindSpore runner reads it (mindspore_runner.py:99)."""
    return group.device_group._get_backend(torch.device("npu")).get_hccl_comm(group.local_rank)


def parallel_problems(server_args: Any) -> list[str]:
    """SGLang parallel layouts sglang-fx does not run (launcher side, from the arguments)."""
    out = []
    if int(getattr(server_args, "pp_size", 1) or 1) > 1:
        out.append("pipeline parallelism (--pp-size > 1) is not supported; use --tp-size")
    if getattr(server_args, "enable_dp_attention", False) or int(getattr(server_args, "attn_dp_size", 1) or 1) > 1:
        out.append("attention data parallelism is not supported; use --dp-size (replicas) and --tp-size")
    return out


#: Speculative algorithms sglang-fx runs. NGRAM needs only verify steps of the target;
#: STANDALONE also runs a draft model (a second sglang-fx runner, `draft_problems`) whose steps
#: are ordinary EXTEND/DECODE steps of the SPI, drafting chains (topk 1) only; EAGLE3 runs the
#: same steps through ModelRunner.forward_hidden (SPI 1.4: the target's captured hidden states
#: feed a LlamaForCausalLMEagle3 draft), on backends declaring Capabilities.eagle3.
SPEC_ALGORITHMS = ("NGRAM", "STANDALONE", "EAGLE3")
#: Draft-model algorithms and the EAGLE topk they run with.
DRAFT_TOPK = {"STANDALONE": 1, "EAGLE3": 1}


def feature_problems(server_args: Any, capabilities: Any = None) -> list[str]:
    """SGLang serving features the backend cannot run (launcher side, from the arguments and
    the backend's Capabilities). Without this, an unsupported speculative algorithm starts and
    dies at its first draft step, and LoRA fails once SGLang's LoRA manager finds no modules to
    wrap in the adapter."""
    out = []
    algorithm = getattr(server_args, "speculative_algorithm", None)
    name = str(algorithm).upper() if algorithm else None
    topk = int(getattr(server_args, "speculative_eagle_topk", None) or 1)
    if algorithm and name not in SPEC_ALGORITHMS:
        out.append(f"speculative decoding with --speculative-algorithm {algorithm} is not supported by sglang-fx backends "
                   f"yet; supported: {', '.join(SPEC_ALGORITHMS)} (STANDALONE and EAGLE3 with --speculative-eagle-topk 1), "
                   "or use --model-impl sglang")  # fmt: skip
    elif name in DRAFT_TOPK and topk != DRAFT_TOPK[name]:
        out.append(f"--speculative-algorithm {name} with --speculative-eagle-topk {topk} is not supported by sglang-fx "
                   f"backends yet (draft trees); use --speculative-eagle-topk {DRAFT_TOPK[name]} (a chain of "
                   "--speculative-num-steps tokens, --speculative-num-draft-tokens = steps + 1)")  # fmt: skip
    elif algorithm and capabilities is not None:
        out += capabilities.validate(verify=spec_verify_kind(server_args), eagle3=name == "EAGLE3")
    if name == "EAGLE3" and int(getattr(server_args, "tp_size", 1) or 1) > 1:
        out.append(f"--speculative-algorithm EAGLE3 with --tp-size {server_args.tp_size} is not supported by sglang-fx "
                   "backends yet (the draft's weights have no sharding rules); use --tp-size 1")  # fmt: skip
    if algorithm and (scheme := _quantization_of(getattr(server_args, "speculative_draft_model_path", None))):
        out.append(f"the draft model {server_args.speculative_draft_model_path} is quantized ({scheme}); a quantized draft "
                   "is not supported by sglang-fx yet: give a float draft checkpoint (the target may stay quantized)")  # fmt: skip
    if getattr(server_args, "enable_lora", False) or getattr(server_args, "lora_paths", None):
        out.append("LoRA adapters (--enable-lora, --lora-paths) are not supported by sglang-fx backends yet; merge the "
                   "adapter into the checkpoint's weights, or use --model-impl sglang")  # fmt: skip
    return out


def _quantization_of(path: Any) -> str | None:
    """The quant_method of a local checkpoint's config.json ("compressed-tensors"...), else None."""
    import json
    from pathlib import Path

    config = Path(str(path)) / "config.json" if path else None
    if config is None or not config.is_file():
        return None
    quant = json.loads(config.read_text()).get("quantization_config")
    return str(quant.get("quant_method", "quantized")) if isinstance(quant, dict) else None


def spec_verify_kind(server_args: Any) -> str:
    """The verify mask a speculative server sends: "tree" when a draft may branch (NGRAM's
    breadth, default 10, or EAGLE's topk above 1), else "chain"."""
    breadth = getattr(server_args, "speculative_ngram_max_bfs_breadth", None)
    if str(getattr(server_args, "speculative_algorithm", "")).upper() == "NGRAM":
        width = 10 if breadth is None else int(breadth)
    else:
        width = int(getattr(server_args, "speculative_eagle_topk", None) or 1)
    return "tree" if width > 1 else "chain"


def cpu_threads_binding(server_args: Any) -> str | None:
    """A value for SGLANG_CPU_OMP_THREADS_BIND when SGLang on CPU needs one and the user set none.

    SGLang 0.5.23 asserts it is set when a host has fewer NUMA nodes than scheduler processes
    (`srt/utils/numa_utils.py::init_threads_binding`); each scheduler takes entry `gpu_id` of the
    "|"-separated list: dp_rank * tp * pp + tp_rank, node-local across nodes. Entries may
    overlap; on hosts without AMX or arm64 SGLang only logs them. This gives every entry an equal
    share of this process's CPUs (several entries share CPUs when there are more entries than
    CPUs). None when there is one scheduler per node or the variable is already set."""
    import os

    tp, dp, pp = (int(getattr(server_args, n, 1) or 1) for n in ("tp_size", "dp_size", "pp_size"))
    entries = tp * dp * pp
    if entries <= 1 or os.environ.get(CPU_THREADS_BIND_ENV):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if entries >= len(cpus):
        return "|".join(str(cpus[i % len(cpus)]) for i in range(entries))
    per = len(cpus) // entries
    chunks = [cpus[i * per : (i + 1) * per] for i in range(entries)]
    return "|".join(f"{c[0]}-{c[-1]}" if len(c) > 1 else str(c[0]) for c in chunks)


# --------------------------------------------------------------------------------------------
# Per-step lookups (inside a forward)
# --------------------------------------------------------------------------------------------


def token_to_kv_pool() -> Any:
    from sglang.srt.model_executor.forward_context import get_token_to_kv_pool

    return get_token_to_kv_pool()


def req_to_token() -> torch.Tensor:
    """[max_running_requests, max_context_len] int32: KV slot of token j of request row r."""
    from sglang.srt.model_executor.forward_context import get_req_to_token_pool

    return get_req_to_token_pool().req_to_token


def kv_buffers(pool: Any) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, int]:
    """(K buffers, V buffers, page size) of SGLang's token-to-KV pool, one [num_slots, *shape]
    tensor per layer, as SGLang allocated them (aliased, not copied): an MHA pool's k_buffer and
    v_buffer ([num_slots, num_kv_heads, head_dim]); an MLA pool's kv_buffer ([num_slots, 1,
    kv_lora_rank + qk_rope_head_dim], line 4864) as K, with no V.
    Raises UnsupportedConfigError for pool layouts the SPI's KVLayout cannot describe."""
    from ..errors import UnsupportedConfigError

    problems = []
    layout = getattr(pool, "kv_cache_layout", "nhd")
    if layout != "nhd":
        problems.append(f"KV cache layout {layout!r} (only 'nhd'; unset SGLANG_USE_HND_KVCACHE)")
    if getattr(pool, "store_dtype", None) is not None and pool.store_dtype != pool.dtype:
        problems.append(f"quantized KV cache ({pool.dtype} stored as {pool.store_dtype}); use --kv-cache-dtype auto")
    if getattr(pool, "start_layer", 0):
        problems.append("pipeline parallelism (the pool starts at a layer other than 0)")
    k, v = _buffers(pool)
    if k is None:
        problems.append(f"KV pool type {type(pool).__name__} (only MHA pools with k_buffer/v_buffer, MLA pools with kv_buffer)")
    if problems:
        raise UnsupportedConfigError("sglang-fx cannot use SGLang's KV pool here: " + "; ".join(problems))
    return list(k), None if v is None else list(v), int(pool.page_size)


def _buffers(pool: Any) -> tuple[Any, Any]:
    k = getattr(pool, "k_buffer", None)
    if k is not None:
        return k, pool.v_buffer
    return getattr(pool, "kv_buffer", None), None


def kv_identity(pool: Any) -> tuple[int, int, int]:
    """Changes when SGLang replaces its pool or reallocates its buffers (a cheap per-step check)."""
    k, v = _buffers(pool)
    return id(pool), k[0].data_ptr(), 0 if v is None else v[0].data_ptr()


def backend_logits_processor(hf_config: Any):
    """SGLang's LogitsProcessor over logits the backend already computed (see below)."""
    from sglang.srt.layers.logits_processor import LogitsProcessor

    class BackendLogitsProcessor(LogitsProcessor):
        """Called as processor(input_ids, logits [T, V], None, forward_batch): `hidden_states`
        are already logits, so the LM head is the identity. Scaling and soft-capping are
        the backend's business and are not applied a second time. Reuses SGLang's pruning
        and input-logprob computation (top-k, token-id logprobs, chunking) unchanged."""

        def __init__(self, config):
            super().__init__(config, skip_all_gather=True)
            self.logit_scale = None
            self.final_logit_softcapping = None

        def _compute_lm_head(self, hidden_states, lm_head, embedding_bias=None, *, out=None):
            return hidden_states

    return BackendLogitsProcessor(hf_config)


def logits_output(next_token_logits: torch.Tensor):
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    return LogitsProcessorOutput(next_token_logits=next_token_logits)


def speculative_algorithm() -> str | None:
    """The server's --speculative-algorithm in upper case ("EAGLE3"...), or None (scheduler
    process, `runtime_context.get_spec()`, published before the models are built)."""
    from sglang.srt.runtime_context import get_spec

    name = getattr(get_spec(), "speculative_algorithm", None)
    return str(name).upper() if name else None


def hidden_wanted(forward_batch: Any) -> str | None:
    """The hidden states SGLang wants back in this step's LogitsProcessorOutput.hidden_states
    (`forward_batch.capture_hidden_mode`, forward_batch_info.py:303): "full" (one row per new
    token, as EAGLE's worker asks of a target's prefill and TARGET_VERIFY and of a draft's
    DRAFT_EXTEND_V2), "last" (the last new token of each sequence: a draft's prefill extend and
    decode steps), or None."""
    mode = getattr(forward_batch, "capture_hidden_mode", None)
    if mode is None or not mode.need_capture():
        return None
    return "full" if mode.is_full() else "last"


def draft_hidden_in(forward_batch: Any) -> torch.Tensor | None:
    """The hidden states an EAGLE draft step takes in, one row per new token: the worker puts
    them in `forward_batch.spec_info.hidden_states` (the target's capture for a draft extend, the
    draft's own previous output for a draft decode step; models/llama_eagle3.py reads them there)."""
    return getattr(getattr(forward_batch, "spec_info", None), "hidden_states", None)


def logits_output_with_hidden(next_token_logits: torch.Tensor, hidden_states: torch.Tensor | None):
    """LogitsProcessorOutput carrying the hidden states EAGLE's worker reads (`hidden_states`)."""
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    return LogitsProcessorOutput(next_token_logits=next_token_logits, hidden_states=hidden_states)


def wants_input_logprobs(forward_batch: Any) -> bool:
    """True when SGLang needs logits of every new token (input logprobs) in this extend step."""
    if not forward_batch.return_logprob or not forward_batch.forward_mode.is_extend():
        return False
    starts = forward_batch.extend_logprob_start_lens_cpu or []
    return any(e - s > 0 for e, s in zip(forward_batch.extend_seq_lens_cpu, starts))
