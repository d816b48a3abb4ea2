"""The MindSpore `spi.ModelRunner`: places an architecture's weights once, then runs each step
as one call of its Decoder Cell, op by op (PyNative) or as a compiled graph (mindspore.jit).

Graphs are compiled on first use, so that no step shape compiles again:
- any step can run the dynamic graph, where every per-step dimension is declared dynamic;
- a step where every sequence has one new token (decode) runs padded to the least of the
  `decode_batches` sizes that holds it (`ForwardMetadata.padded_decode`), on a graph of that
  batch size where only the sequence length is dynamic. That graph's kernels skip MindSpore's
  per-launch shape work, which made decode about 20% faster (Qwen3, hidden 512, batch 8, CPU);
  a new size in a bucket reuses its graph, as SGLang's CUDA graphs do.

A graph compiles in seconds (about 7 s each for SmolLM2-135M's 30 layers on 2 CPU cores), so
the first step at a new decode size stalls that long. The `precompile` option compiles the
prefill graph and the chosen decode graphs before the first step instead (one log line each),
as SGLang captures CUDA graphs at start-up; in SGLang that is during the server's warm-up
request, before it reports ready.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import types
from collections.abc import Mapping, Sequence

import mindspore as ms
import torch
from mindspore import Tensor, enable_dynamic

from sglang_fx import buckets
from sglang_fx.checkpoint import EAGLE3_ARCH, ModelSpec
from sglang_fx.eagle3 import check_capture, check_draft_hidden, refuse_plain_forward
from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.kv_pool import KVLayout
from sglang_fx.metadata import ForwardMetadata, ForwardMode
from sglang_fx.sharding import Shard
from sglang_fx.spi import RunnerOptions

from . import collectives, int8
from .attention import make_attention
from .compile_cache import CompileCache, refuse_process_wide_cache
from .decoder import Decoder
from .deepseek_v3 import DeepseekV3
from .exchange import MindSporeExchange
from .kernels import parameters
from .kv_cache import MindSporeKVCache
from .layers import gathers_experts, linear
from .llama import LlamaFamily
from .llama_eagle3 import LlamaEagle3
from .pieces import split
from .plugin import CAPABILITIES
from .runtime import DEVICE_TARGETS, ms_dtype

logger = logging.getLogger(__name__)

OPTIONS = tuple(CAPABILITIES.options)  # the keys of RunnerOptions.extra this backend takes
MODES = ("jit", "pynative")
#: Default `attention_scores`: 2^23 float32 values (32 MB) per score tensor. SmolLM2's 8 x 512-token
#: chat prefill (18.9M values) runs as 3 pieces, an 8192-token prompt as 2^23 / (Hq * 8192)-token chunks.
ATTENTION_SCORES = 1 << 23

#: HF architecture -> its Decoder; the plugin's Capabilities.architectures lists the same names.
ARCHITECTURES: dict[str, type[Decoder]] = {
    "Qwen3ForCausalLM": LlamaFamily,
    "Qwen3MoeForCausalLM": LlamaFamily,
    "Qwen2ForCausalLM": LlamaFamily,
    "LlamaForCausalLM": LlamaFamily,
    "DeepseekV3ForCausalLM": DeepseekV3,
    EAGLE3_ARCH: LlamaEagle3,  # a draft: runs only through forward_hidden
}


class MindSporeRunner:
    """`spi.ModelRunner` over the architecture's Decoder (ARCHITECTURES). options.extra:
    "mode": "jit" (default) | "pynative";
    "decode_batches": the decode graphs' batch sizes, comma-separated ("1,2,4,8"), or "none"
    (decode runs the dynamic graph); default `sglang_fx.buckets.DECODE_BATCHES`; jit only;
    "precompile": "none" (default: compile each graph on first use), "all" (the prefill graph and
    every decode graph), or decode batch sizes ("1,2,4,8", each one of decode_batches): compiled
    on the first forward, before its step; jit only;
    "compile_cache": a directory where the precompiled graphs are kept across restarts
    (`compile_cache.CompileCache`); needs precompile;
    "attention_scores": the most values one step's attention scores may hold per layer
    (B * Hq * E * L for the portable tier) before the step runs as several (`pieces.split`);
    default ATTENTION_SCORES.

    Weights are placed at construction; the attention tier, the step Cell and its compiled graph
    depend on the KV layout, so they are built on the first forward (and again only if a cache
    of another layout arrives)."""

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], options: RunnerOptions, exchange: MindSporeExchange):
        refuse_process_wide_cache()
        unknown = sorted(set(options.extra) - set(OPTIONS))
        if unknown:
            raise UnsupportedConfigError(f"mindspore backend: unknown option(s) {unknown}; it takes {', '.join(OPTIONS)}")
        mode = options.extra.get("mode", "jit")
        if mode not in MODES:
            raise UnsupportedConfigError(f"mindspore backend: mode {mode!r} is not one of {' | '.join(MODES)}")
        self.decode_batches = buckets.decode_batches(options.extra.get("decode_batches"), "mindspore") if mode == "jit" else ()
        precompile = options.extra.get("precompile")
        if mode != "jit" and precompile not in (None, "none"):
            raise UnsupportedConfigError(f"mindspore backend: precompile {precompile!r} needs mode jit (mode {mode} compiles nothing)")
        self.precompile = buckets.precompile_batches(precompile, self.decode_batches, "mindspore")
        self.cache_root = options.extra.get("compile_cache")
        scores = options.extra.get("attention_scores", str(ATTENTION_SCORES))
        if not str(scores).isdigit() or int(scores) < 1:
            raise UnsupportedConfigError(f"mindspore backend: attention_scores {scores!r} is not a positive number of values "
                                         f"(default {ATTENTION_SCORES})")  # fmt: skip
        self.attention_scores = int(scores)
        if self.cache_root is not None and self.precompile is None:
            raise UnsupportedConfigError("mindspore backend: compile_cache keeps the precompiled graphs; set precompile too "
                                         "(e.g. precompile=all)")  # fmt: skip
        if spec.architecture not in ARCHITECTURES:
            raise UnsupportedConfigError(
                f"mindspore backend: architecture {spec.architecture!r} is not supported; it runs {', '.join(ARCHITECTURES)}"
            )
        self.shard = Shard.of(spec, options.parallel)
        self.comm = collectives.start(options.parallel, options.device)
        self.spec, self.exchange, self.device, self.mode = self.shard.local, exchange, options.device, mode
        self.decoder = ARCHITECTURES[spec.architecture]
        self.layout: KVLayout | None = None  # the layout the step below was built for
        target = DEVICE_TARGETS[options.device.partition(":")[0]]
        product = int8.select(target)  # before any graph is traced
        if spec.quant is not None:
            logger.info("sglang-fx mindspore: W8A8 linears by %s", product)

        placed: dict[int, Tensor] = {}  # id(torch tensor) -> its MindSpore tensor: a tied embedding is placed once

        def load(t):  # nested tuples of torch tensors -> MindSpore; aliases host memory on CPU, copies to a device
            if isinstance(t, tuple):
                return tuple(load(x) for x in t)
            if id(t) not in placed:
                x = exchange.from_torch(t)
                placed[id(t)] = x if target == "CPU" else x.move_to(target)
            return placed[id(t)]

        self.weights = parameters(load(self.decoder.weights(weights, self.shard)))

    def apply_linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The optional probe of spi.ModelRunner: the linear `name` (HF module name) as this runner
        holds it (`Decoder.find_linear`; a fused projection's product cut to its rows), on x [T, in]
        float32 torch (cast to the model's dtype) -> float32 [T, out], op by op with the step's ops."""
        w, rows = self.decoder.find_linear(self.weights, self.shard, name)
        y = self.exchange.to_torch(linear(self.exchange.from_torch(x.to(self.spec.dtype).contiguous()), w)).float()
        return y if rows is None else y[:, rows.start : rows.stop]

    def _bind(self, layout: KVLayout) -> None:
        attn_spec = self.decoder.attention_spec(self.spec)
        self.attn = make_attention(attn_spec, layout, self.device, self.spec.dtype, self.exchange)
        has_values, in_graph = layout.v_shape is not None, self.mode == "jit"
        self.model = self.decoder(self.shard, self.weights, self.attn, self.comm, ms_dtype(layout.dtype), has_values, in_graph)
        self._graphs: dict[tuple, object] = {}  # (decode batch size or None: the dynamic graph, attention variant) -> graph
        self.layout = layout

    def _step(self, batch: int | None, *args):
        """The Decoder on args: op by op, or on the graph for `batch` (compiled on first use)."""
        if self.mode == "pynative":
            return self.model(*args)
        key = (batch, self.attn.variant)
        if key not in self._graphs:
            self._graphs[key] = self._compile(*key)
        return self._graphs[key](*args)

    def _compile(self, batch: int | None, variant: int):
        """The step as a jit graph for one-token steps of `batch` sequences, whose sizes are all
        fixed but the sequence length; batch None: for any step, every size dynamic. variant: the
        attention's (`signature`): a graph per variant, as MindSpore compiles one per constant anyway."""
        model = self.model
        # The Cell's own construct, as a function object of its own per graph (enable_dynamic marks
        # the function it decorates), called with the Cell as `self`: so MindSpore knows the graph
        # belongs to this Cell and binds the Cell's registered Parameters by name, which its
        # compile cache needs to give a loaded graph its weights.
        construct = type(model).construct
        step = types.FunctionType(construct.__code__, construct.__globals__, "construct", construct.__defaults__,
                                  construct.__closure__)  # fmt: skip
        tokens = {}
        if batch is None:
            i32, i64 = ms.int32, ms.int64
            tokens = dict(input_ids=Tensor(shape=[None], dtype=i32), positions=Tensor(shape=[None], dtype=i64),
                          logits_indices=Tensor(shape=[None], dtype=i32), slots=Tensor(shape=[None], dtype=i64),
                          **self.decoder.dynamic_inputs)  # fmt: skip
        return functools.partial(enable_dynamic(**tokens, attn_inputs=self.attn.signature(batch, variant))(ms.jit(step)), model)

    def _decode_batch(self, meta: ForwardMetadata) -> int | None:
        """The decode graph's batch size for this step, or None (the dynamic graph)."""
        if not meta.one_token_each:
            return None
        return buckets.fit(meta.batch_size, self.decode_batches)

    def _compile_ahead(self, cache: MindSporeKVCache, device: torch.device) -> None:
        """Compile the prefill graph (without a cached prefix; for MoE both expert paths) and the
        `precompile` decode graphs by running a dummy step on each. Still compiled on first use:
        variants of the dynamic graph that the dummies do not take (the Ascend tier's prefix-hit
        and large-decode kernels; decode above the largest bucket). Only on the first forward:
        the pool holds no K/V yet, so the dummy steps' writes (page 0) touch nothing a sequence
        owns, and the real step then writes its own slots."""
        prefills = [("prefill", 2)]
        if self.spec.moe is not None:  # a long prefill computes the experts densely: another graph
            prefills.append(("prefill (dense experts)", -(-self.spec.moe.num_experts // self.spec.moe.top_k)))
        steps = buckets.warmup_steps(self.layout.page_size, self.precompile, prefills, device=str(device))
        store = None
        if self.cache_root is not None:
            key = [repr(self.spec), repr(self.layout), self.mode, self.device, self.decode_batches, [label for label, _ in steps],
                   self.shard.parallel.tp_rank, self.shard.parallel.tp_size, self.shard.parallel.ep_size]  # fmt: skip
            store = CompileCache(self.cache_root, key)
        with store if store is not None else contextlib.nullcontext():
            for label, meta in steps:
                start = time.perf_counter()
                self.forward(torch.zeros(meta.num_tokens, dtype=torch.int64, device=device), meta, cache)
                logger.info("sglang-fx mindspore: %s graph compiled in %.1f s%s", label, time.perf_counter() - start,
                            f" (compile cache: {store.state})" if store is not None else "")  # fmt: skip

    def _ready(self, meta: ForwardMetadata, cache: MindSporeKVCache) -> None:
        if cache.layout != self.layout:
            first = self.layout is None
            self._bind(cache.layout)
            if first and self.precompile is not None and self.spec.eagle3 is None:  # a draft compiles on first use
                self._compile_ahead(cache, meta.positions.device)

    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: MindSporeKVCache) -> torch.Tensor:
        if self.spec.eagle3 is not None:
            raise refuse_plain_forward(self.spec)
        self._ready(meta, cache)
        wanted, batch = len(meta.logits_indices), self._decode_batch(meta)
        # A VERIFY step is never split: its draft tokens' tree mask spans the sequence's new tokens.
        if batch is None and self.attn.pads_scores and meta.mode is not ForwardMode.VERIFY:
            pieces = split(meta, input_ids, self.attn.num_heads, self.attention_scores)
            if len(pieces) > 1:  # in order: a later piece reads the K/V the earlier ones stored
                out = None
                for p in pieces:
                    logits = self._run(p.input_ids, p.meta, cache, None)
                    out = logits.new_empty((wanted, logits.shape[1])) if out is None else out
                    out[p.logits_rows] = logits[: len(p.logits_rows)]
                return out
        return self._run(input_ids, meta, cache, batch)[:wanted]

    def forward_hidden(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: MindSporeKVCache, *,
                       capture: Sequence[int] = (), hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """spi.ModelRunner.forward_hidden: a target's step returning its `capture` layers' inputs, or
        the EAGLE3 draft's step on `hidden`. Never split into pieces (the hidden rows span the step)."""
        T = meta.num_tokens
        if self.spec.eagle3 is not None:
            project = check_draft_hidden(self.spec, hidden, T, capture)
            extra = (hidden.float(), project)
        else:
            if hidden is not None:
                raise ValueError(f"hidden was given to a {self.spec.architecture} target; only an EAGLE3 draft takes hidden states")
            check_capture(capture, self.spec.num_layers)
            extra = (tuple(capture),) if capture else ()
        self._ready(meta, cache)
        out = self._run(input_ids, meta, cache, self._decode_batch(meta), extra)
        logits, taken = out if extra else (out, None)
        return logits[: len(meta.logits_indices)], None if taken is None else taken[:T]

    def _run(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: MindSporeKVCache, batch: int | None,
             extra: tuple = ()):  # fmt: skip
        """One step on the graph for `batch` (None: the dynamic graph) -> logits [>= N, V] float32.
        extra: the trailing `construct` inputs of forward_hidden (a target's capture, or the draft's
        hidden [T, W] float32 torch and whether fc projects it); then (logits, hidden [>= T, ...])."""
        if extra and not isinstance(extra[0], tuple):  # the draft's hidden rows, padded like the tokens
            pad = (batch - meta.batch_size) if batch is not None else 0
            hidden = torch.cat([extra[0], extra[0][-1:].expand(pad, -1)]) if pad > 0 else extra[0]
            extra = (self.exchange.from_torch(hidden.contiguous()), extra[1])
        if batch is not None:
            meta, input_ids = meta.padded_decode(input_ids, batch)
        self.attn.plan(meta)
        keys, values = self.attn.cache_views(cache)
        ex = self.exchange.from_torch
        gather_experts = self.spec.moe is not None and gathers_experts(meta.num_tokens, self.spec.moe)
        # Gather indices as int32: MindSpore's CPU Gather casts int64 indices with a kernel of its own.
        ids, logits_indices = input_ids.to(torch.int32), meta.logits_indices.to(torch.int32)
        out = self._step(batch, keys, values, cache.slot_views, ex(ids), ex(meta.positions), ex(logits_indices),
                         ex(meta.out_cache_loc), self.attn.inputs, self.attn.variant, gather_experts, batch is not None, *extra)  # fmt: skip
        if isinstance(out, tuple):
            return tuple(self.exchange.output_to_torch(o) for o in out)
        return self.exchange.output_to_torch(out)
