"""The MindSpore `spi.ModelRunner`: places an architecture's weights once, then runs each step
as one call of its Decoder Cell, op by op (PyNative) or as one compiled graph: mindspore.jit
with every per-step dimension declared dynamic, so a new batch size or length reuses the graph.
"""

from __future__ import annotations

from collections.abc import Mapping

import mindspore as ms
import torch
from mindspore import Tensor, enable_dynamic

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.kv_pool import KVLayout
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.spi import RunnerOptions

from .attention import make_attention
from .decoder import Decoder
from .deepseek_v3 import DeepseekV3
from .exchange import MindSporeExchange
from .kernels import parameters
from .kv_cache import MindSporeKVCache
from .layers import gathers_experts
from .llama import LlamaFamily
from .runtime import DEVICE_TARGETS, ms_dtype

MODES = ("jit", "pynative")

#: HF architecture -> its Decoder; the plugin's Capabilities.architectures lists the same names.
ARCHITECTURES: dict[str, type[Decoder]] = {
    "Qwen3ForCausalLM": LlamaFamily,
    "Qwen3MoeForCausalLM": LlamaFamily,
    "Qwen2ForCausalLM": LlamaFamily,
    "LlamaForCausalLM": LlamaFamily,
    "DeepseekV3ForCausalLM": DeepseekV3,
}


class MindSporeRunner:
    """`spi.ModelRunner` over the architecture's Decoder (ARCHITECTURES). options.extra:
    {"mode": "jit" (default) | "pynative"}.

    Weights are placed at construction; the attention tier, the step Cell and its compiled graph
    depend on the KV layout, so they are built on the first forward (and again only if a cache
    of another layout arrives)."""

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], options: RunnerOptions, exchange: MindSporeExchange):
        unknown = sorted(set(options.extra) - {"mode"})
        if unknown:
            raise UnsupportedConfigError(f"mindspore backend: unknown option(s) {unknown}; it takes only 'mode' ({' | '.join(MODES)})")
        mode = options.extra.get("mode", "jit")
        if mode not in MODES:
            raise UnsupportedConfigError(f"mindspore backend: mode {mode!r} is not one of {' | '.join(MODES)}")
        if spec.architecture not in ARCHITECTURES:
            raise UnsupportedConfigError(
                f"mindspore backend: architecture {spec.architecture!r} is not supported; it runs {', '.join(ARCHITECTURES)}"
            )
        self.spec, self.exchange, self.device, self.mode = spec, exchange, options.device, mode
        self.decoder = ARCHITECTURES[spec.architecture]
        self.layout: KVLayout | None = None  # the layout the step below was built for
        target = DEVICE_TARGETS[options.device.partition(":")[0]]

        def load(t):  # nested tuples of torch tensors -> MindSpore; aliases host memory on CPU, copies to a device
            if isinstance(t, tuple):
                return tuple(load(x) for x in t)
            x = exchange.from_torch(t)
            return x if target == "CPU" else x.move_to(target)

        self.weights = parameters(load(self.decoder.weights(weights, spec)))

    def _bind(self, layout: KVLayout) -> None:
        attn_spec = self.decoder.attention_spec(self.spec)
        self.attn = make_attention(attn_spec, layout, self.device, self.spec.dtype, self.exchange)
        has_values, in_graph = layout.v_shape is not None, self.mode == "jit"
        self.model = self.decoder(self.spec, self.weights, self.attn, ms_dtype(layout.dtype), has_values, in_graph)
        self._step = self.model if self.mode == "pynative" else self._compile()
        self.layout = layout

    def _compile(self):
        i32, i64 = ms.int32, ms.int64
        return enable_dynamic(
            input_ids=Tensor(shape=[None], dtype=i32),
            positions=Tensor(shape=[None], dtype=i64),
            logits_indices=Tensor(shape=[None], dtype=i32),
            slots=Tensor(shape=[None], dtype=i64),
            attn_inputs=self.attn.dynamic_inputs,
        )(ms.jit(self.model.construct))

    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: MindSporeKVCache) -> torch.Tensor:
        if cache.layout != self.layout:
            self._bind(cache.layout)
        self.attn.plan(meta)
        keys, values = self.attn.cache_views(cache)
        ex = self.exchange.from_torch
        gather_experts = self.spec.moe is not None and gathers_experts(meta.num_tokens, self.spec.moe)
        # Gather indices as int32: MindSpore's CPU Gather casts int64 indices with a kernel of its own.
        ids, logits_indices = input_ids.to(torch.int32), meta.logits_indices.to(torch.int32)
        out = self._step(keys, values, cache.slot_views, ex(ids), ex(meta.positions), ex(logits_indices),
                         ex(meta.out_cache_loc), self.attn.inputs, self.attn.variant, gather_experts)  # fmt: skip
        return self.exchange.to_torch(out)
