"""The sglang-fx backend SPI, as pluggy hook specifications.

A backend is one plugin module (named by an entry point in group `sglang_fx.backends`) that
implements these hooks with `@sglang_fx.hookimpl`. Pluggy is used for discovery, validation and
selection only: the factory hooks run once per model load, and the per-step path calls the
returned objects (Protocols in `sglang_fx.spi`) directly.

Rules for implementations:
- Import the framework lazily, inside the hooks. `sglang_fx_backend_info` must not raise when
  the framework or device is missing: it reports `unavailable` with the reason.
- Every factory returns an object satisfying its Protocol, checked when it is returned.
- Loading is re-entrant: every SGLang worker process loads the plugin again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch

    from .checkpoint import ModelSpec
    from .kv_pool import KVLayout
    from .spi import Attention, AttentionSpec, BackendInfo, Exchange, KVCache, ModelRunner, RunnerOptions

PROJECT = "sglang_fx"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Backend info
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def sglang_fx_backend_info() -> BackendInfo:
    """Describe the backend: name, framework and version, capabilities, known conformance
    gaps, and `unavailable` with a reason when it cannot run here. Cheap, never raises."""


# --------------------------------------------------------------------------------------------
# Tensor exchange
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def sglang_fx_make_exchange(device: str) -> Exchange:
    """Return the DLPack exchange between torch and the framework on `device` ("cpu",
    "cuda:0", "npu:0"). See `spi.Exchange` for the copy/alias contract."""


# --------------------------------------------------------------------------------------------
# KV pool
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def sglang_fx_make_kv_cache(
    layout: KVLayout, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor] | None, device: str
) -> KVCache:
    """Wrap host-owned KV buffers (one [num_slots, *layout.k_shape] torch tensor per layer for
    K, likewise for V, or None when layout.v_shape is None) as the backend's KVCache. The
    buffers stay owned by the host (our PagedKVPool, or SGLang's pool) and are aliased, never
    copied: the host keeps them alive for the KVCache's lifetime."""


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def sglang_fx_make_attention(spec: AttentionSpec, layout: KVLayout, device: str) -> Attention:
    """Return the paged attention for one model's geometry over pools of `layout`. The
    backend picks its kernel tier from the device's capability (portable or fused)."""


# --------------------------------------------------------------------------------------------
# Model runner
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def sglang_fx_make_runner(spec: ModelSpec, weights: Mapping[str, torch.Tensor], options: RunnerOptions) -> ModelRunner:
    """Build a model from its spec and HF-named weights (host torch tensors in spec.dtype,
    from `Checkpoint.load`; the backend may alias or copy them, and must not modify them) on
    options.device. spec describes the whole checkpoint; under tensor parallelism
    (options.parallel.tp_size > 1) the weights are this rank's slices and
    `sglang_fx.sharding.Shard.of(spec, options.parallel)` has the rank's sizes, and every rank
    must return the same full-vocabulary logits. Weights are placed now; the KV layout is not known yet (SGLang sizes its
    pool from the memory left after loading) and arrives with the KVCache at forward time.
    The host makes the runner before any other object of the backend in the process (SGLang
    does, and so does `sglang_fx.generate.Session`): a runner may have to start its collective
    library before any other work of its framework (JAX's `jax.distributed.initialize` must).
    An EAGLE3 draft (spec.eagle3 set; SPI 1.4, only to a backend declaring Capabilities.eagle3)
    arrives by its own weight names, completed from its target (`sglang_fx.eagle3.draft_weights`),
    d2t as int64; its runner is driven by `forward_hidden` (sglang_fx/spi.py).
    Raises UnsupportedConfigError for a configuration outside its capabilities and for
    unknown options.extra keys."""
