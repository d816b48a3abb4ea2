"""The objects a backend hands back from its factory hooks, as typed Protocols.

The per-step path calls these objects directly (never through pluggy). Contracts are written
here once; implementations stay lean. "Array" below means the backend framework's own tensor
type (torch.Tensor for the reference backend, mindspore.Tensor for MindSpore, ...).

Shape notation: T new tokens in the step, Hq query heads, Hkv KV heads, D head dim, Dv value
head dim, S = KVLayout.num_slots. See ForwardMetadata for B, L, N.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .capabilities import Capabilities
from .checkpoint import ModelSpec
from .kv_pool import KVLayout
from .metadata import ForwardMetadata
from .parallel import SINGLE, Parallel

Array = Any  # the backend framework's tensor type

#: The version of this SPI, "MAJOR.MINOR". A backend declares the version it was written for
#: (`BackendInfo.spi_version`) and runs on any sglang-fx of the same MAJOR and a MINOR at least
#: its own. The rules that keep that promise:
#: - a MINOR adds only what a backend written for an older MINOR need not know: a new optional
#:   hook argument (pluggy passes an implementation only the arguments it names), a new
#:   Capabilities field that defaults to "not supported", a new RunnerOptions field with the
#:   old behaviour as its default, a new optional method a host probes for;
#: - anything else (a new required hook, a changed contract, shape or dtype) is a new MAJOR,
#:   and backends of the old MAJOR are refused with the versions that match.
#: History: 1.0, the five hooks. 1.1, parallelism: Capabilities.parallelism and .options,
#: RunnerOptions.parallel, and the runner made before any other object of the backend.
#: 1.2, speculative verification: ForwardMode.VERIFY with ForwardMetadata.tree_mask (and
#: .visible), Capabilities.verify; the host sends VERIFY steps only to a backend declaring it.
#: 1.3, quantized checkpoints: Capabilities.quantization, ModelSpec.quant, and for a quantized
#: checkpoint int8 weights plus float32 `weight_scale`s in the runner's weights (sglang_fx/quant.py);
#: a backend written for 1.1 or 1.2 declares no scheme, so it keeps running float checkpoints and is
#: refused (at start-up, naming the scheme) only for quantized ones.
#: 1.4, EAGLE3's model side: Capabilities.eagle3 and the optional ModelRunner.forward_hidden (hidden
#: states out of a target step, into and out of a LlamaForCausalLMEagle3 draft step), ModelSpec.eagle3;
#: a backend written for 1.3 or older declares no eagle3 and is refused only for EAGLE3.
SPI_VERSION = "1.4"


def spi_problem(declared: str) -> str | None:
    """Why a backend written for SPI `declared` cannot run on this sglang-fx, or None."""
    try:
        major, minor = (int(p) for p in declared.split("."))
    except ValueError:
        return f"its SPI version {declared!r} is not MAJOR.MINOR (e.g. {SPI_VERSION!r})"
    ours_major, ours_minor = (int(p) for p in SPI_VERSION.split("."))
    if major == ours_major and minor <= ours_minor:
        return None
    newer = (major, minor) > (ours_major, ours_minor)
    return (f"it was written for sglang-fx SPI {declared}, and this sglang-fx has SPI {SPI_VERSION}, which runs backends written "
            f"for SPI {ours_major}.0 to {SPI_VERSION}; " + ("upgrade sglang-fx" if newer else f"install a version of the backend for SPI {ours_major}.x"))


@dataclass(frozen=True)
class BackendInfo:
    """What `sglang-fx backends` shows, and what selection checks.

    name                the entry-point name, e.g. "mindspore".
    framework           the framework's import name, e.g. "mindspore".
    framework_version   its installed version, or None when it is not installed.
    capabilities        what it runs; None when unavailable.
    unavailable         None when usable here, else the reason and the fix, e.g.
                        "mindspore is not installed: pip install mindspore==2.10.0".
    known_gaps          conformance case name -> reason it is expected to fail. A listed case
                        that passes fails the conformance run, so the list cannot go stale.
    spi_version         the SPI version the backend was written for (see SPI_VERSION); a
                        backend that declares none was written for 1.0, the first.
    """

    name: str
    framework: str
    framework_version: str | None
    capabilities: Capabilities | None
    unavailable: str | None = None
    known_gaps: Mapping[str, str] = field(default_factory=dict)
    spi_version: str = "1.0"


@dataclass(frozen=True)
class AttentionSpec:
    """One model's attention geometry. scale multiplies q.k (usually D ** -0.5)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    scale: float


@runtime_checkable
class Exchange(Protocol):
    """Tensor exchange between torch (the host) and the backend framework, by DLPack.

    copy=None copies only when it must (a non-contiguous input is made contiguous, since some
    frameworks misread DLPack strides); copy=False never copies and raises BufferError when
    it would have to; copy=True always copies. Without a copy the result aliases the input:
    a write through either is seen by the other, and the caller keeps the input alive.
    Devices are preserved; no global device synchronize happens.
    """

    def from_torch(self, t: torch.Tensor, *, copy: bool | None = None) -> Array: ...

    def to_torch(self, x: Array, *, copy: bool | None = None) -> torch.Tensor: ...


@runtime_checkable
class KVCache(Protocol):
    """The backend's view of a host-owned paged KV pool (see kv_pool.py for the layout).

    k(layer): [S, *layout.k_shape] array aliasing the host's K buffer of that layer.
    v(layer): same for V, or None when layout.v_shape is None.
    write(layer, slots, k, v): store k [n, *k_shape] (and v [n, *v_shape]) at slots [n] int64,
        in place in the host's memory. Other slots are untouched. v is None iff v_shape is None.
    """

    layout: KVLayout

    def k(self, layer: int) -> Array: ...

    def v(self, layer: int) -> Array | None: ...

    def write(self, layer: int, slots: Array, k: Array, v: Array | None) -> None: ...


@runtime_checkable
class Attention(Protocol):
    """Paged attention over a KVCache for every layer of one model.

    plan(meta): once per step, before any layer; precomputes what every layer shares (slot
        tables, masks, block tables) from the ForwardMetadata.
    forward(layer, q, k, v, cache): q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv] for the new
        tokens. Writes k/v into the cache at meta.out_cache_loc, then attends causally: new
        token i of sequence b sees its sequence's tokens 0..prefix_lens[b] + i (cached prefix
        and new; indices into req_to_token[b]). In a VERIFY step (only sent to a backend
        declaring Capabilities.verify) it sees the committed prefix and the new tokens its
        tree-mask row allows instead; `meta.visible(b)` gives either mask as [D_b, L_b] bool.
        Mask by token index, never by meta.positions (in VERIFY they are tree depths).
        Returns [T, Hq, Dv] in q's dtype.
        v is None iff the cache layout has no V (MLA): the values are then the first Dv
        channels of the keys (the latent), with Hkv == 1.
        Grouped-query attention: query head h reads KV head h // (Hq // Hkv).
    The KVCache and out_cache_loc of `forward` are the step's: keep what `plan` needs of the
    metadata (forward gets none). A model runner may use its own Attention (and call `plan`
    itself); the `sglang_fx_make_attention` hook's object serves hosts that call attention
    directly, and the conformance suite's attention cases.
    """

    def plan(self, meta: ForwardMetadata) -> None: ...

    def forward(self, layer: int, q: Array, k: Array, v: Array | None, cache: KVCache) -> Array: ...


@runtime_checkable
class ModelRunner(Protocol):
    """A loaded model.

    forward(input_ids, meta, cache): input_ids [T] int64 torch tensor of the step's new
        tokens; writes their K/V into cache; returns float32 torch logits [N, vocab] for
        meta.logits_indices, in that order. The logits are an ordinary tensor the caller owns,
        not one made under torch.inference_mode: SGLang's sampler updates them in place.

    Optional (SPI 1.3), probed with hasattr by the conformance suite's "w8a8/linear" cases:
    apply_linear(name, x): the model's linear `name` (HF module name, "model.layers.0.mlp.down_proj")
        as loaded, on x [T, in] float32 torch (cast to the model's dtype first) -> [T, out]
        float32 torch; for a quantized linear, its W8A8 product (sglang_fx/quant.py).

    Optional (SPI 1.4), on every runner of a backend declaring Capabilities.eagle3, and only there:
    forward_hidden(input_ids, meta, cache, *, capture=(), hidden=None) -> (logits, hidden_out):
        the step of `forward` (same input_ids, meta, cache and logits), with hidden states in and out.
        All hidden tensors are float32 torch on the step's device, one row per new token (T rows,
        every new token, not only meta.logits_indices); the caller owns what is returned, and the
        runner keeps no reference to `hidden` after the call.
        - A target model (spec.eagle3 is None): capture = layer indices i, 0 <= i < num_layers,
          strictly increasing (SGLang's `layers_to_capture`, which it concatenates in layer order;
          `sglang_fx.eagle3.capture_layers` derives them). hidden_out [T, H * len(capture)]: column block k
          holds the residual stream entering layer capture[k] (before that layer's input norm),
          which is transformers' `output_hidden_states[capture[k]]` (0: the embeddings); None when
          capture is empty. hidden must be None.
        - An EAGLE3 draft (spec.eagle3 set, architecture LlamaForCausalLMEagle3; `sglang_fx.eagle3`
          writes its computation down): hidden is required, either [T, eagle3.num_aux *
          eagle3.target_hidden_size] (a target's capture for the same rows, which the draft's fc
          projects to H) or [T, H] (the draft's own earlier hidden_out, used as is). capture must
          be empty. logits [N, eagle3.draft_vocab_size] over the draft vocabulary (draft id d is
          target id d + d2t[d]: `sglang_fx.eagle3.hot_token_ids`); hidden_out [T, H], the residual
          stream after its decoder layer, before the final norm (what SGLang feeds the next draft
          step). Its plain `forward` raises, naming forward_hidden.
        Raises ValueError naming the argument on a shape, index or role mismatch.
    """

    spec: ModelSpec

    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: KVCache) -> torch.Tensor: ...


@dataclass(frozen=True)
class RunnerOptions:
    """How to run a model.

    device      "cpu", "cuda:0", "npu:0"...: this rank's local device.
    extra       backend-specific settings (e.g. MindSpore's {"mode": "pynative"}); a backend
                rejects keys it does not know.
    parallel    this rank's place in the process layout (`sglang_fx.parallel.Parallel`). With
                tp_size > 1 the runner receives only this rank's weights (`sharding.Shard`:
                `Shard.of(spec, parallel).local` has its sizes), creates its collective
                library's communicators for `parallel.tp` at construction (starting from
                `parallel.rendezvous`), and returns the same full-vocabulary logits on every rank.
    """

    device: str = "cpu"
    extra: Mapping[str, str] = field(default_factory=dict)
    parallel: Parallel = SINGLE
