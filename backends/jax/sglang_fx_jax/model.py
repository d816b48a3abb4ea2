"""The JAX `spi.ModelRunner`: the architecture's Decoder as two XLA programs per shape bucket,
`body` (the layers, returning the hidden states and the new K/V) and `head` (the logits of the
wanted rows), so that a new number of wanted rows compiles only the small head.

Extend steps (prefills, prefix hits, mixed batches) come in many more shape buckets than decode
steps, and a whole-model program compiles in seconds to minutes (SmolLM2's 30 layers: 15-53 s
per extend bucket on 2 cores, loaded), which a server's first requests of each new shape wait
for. So by default (`extend=layered`) an extend step runs as a small program per layer kind,
called once per layer on that layer's weights and pool (`Decoder.start`, `Decoder.layer`, then
`head`): one layer compiles per bucket instead of all of them, for a dispatch per layer.
Decode steps, few buckets that `precompile` can compile ahead, keep the whole-model body.

Per step, on the host: pad the step to its bucket (decode: `ForwardMetadata.padded_decode` to
the least `decode_batches` size that holds it, context to a power of two of at least
`attention.DECODE_CONTEXT`; any other step: tokens
and keys to powers of two, `attention.plan`), run body then head, store the new K/V rows into the
pool (`JaxKVCache.write_layers`, the only copy into host memory besides the logits), and return
the logits, which alias the head's output buffer (no copy).

A program compiles on first use of its bucket (seconds), and JAX's persistent compilation cache
(`runtime.use_compile_cache`) keeps it across restarts. `precompile` compiles the prefill bucket
of the smallest sizes and the chosen decode batch sizes (at the smallest context bucket, which
holds every context up to `attention.DECODE_CONTEXT`) on the
first step instead, as SGLang captures CUDA graphs at start-up, with one log line each.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from sglang_fx import buckets
from sglang_fx.checkpoint import ModelSpec
from sglang_fx.eagle3 import check_capture
from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.sharding import Shard
from sglang_fx.spi import RunnerOptions

from . import attention
from .deepseek_v3 import deepseek_v3
from .kv_cache import JaxKVCache
from .layers import linear
from .llama import llama_family
from .placement import place
from .plugin import CAPABILITIES
from .runtime import check_device, configure, use_compile_cache

logger = logging.getLogger(__name__)

#: HF architecture -> its Decoder factory; the plugin's Capabilities.architectures lists the same names.
ARCHITECTURES = {
    "Qwen3ForCausalLM": llama_family,
    "Qwen3MoeForCausalLM": llama_family,
    "Qwen2ForCausalLM": llama_family,
    "LlamaForCausalLM": llama_family,
    "DeepseekV3ForCausalLM": deepseek_v3,
}  # and the EAGLE3 draft: llama_eagle3.JaxEagle3 (plugin.sglang_fx_make_runner)

#: The "moe" option -> `layers.moe`'s gather argument.
MOE = {"auto": None, "dense": False, "gather": True}


class JaxRunner:
    """`spi.ModelRunner`. options.extra: "decode_batches" (default `buckets.DECODE_BATCHES`;
    "none": decode steps run as extend steps), "precompile" (none | all | decode batch sizes),
    "layers" (unroll | scan), "extend" (layered | whole; layered needs layers=unroll), "moe" (auto | dense | gather:
    `layers.moe`), "compile_cache" (a directory, or none); every value is checked
    before anything starts. Weights are placed at construction: linear weights as transposed
    copies, the others aliasing the host's tensors (`Decoder.arrange`)."""

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], options: RunnerOptions):
        unknown = sorted(set(options.extra) - set(CAPABILITIES.options))
        if unknown:
            raise UnsupportedConfigError(f"jax backend: unknown option(s) {unknown}; it takes {', '.join(CAPABILITIES.options)}")
        if spec.architecture not in ARCHITECTURES:
            raise UnsupportedConfigError(f"jax backend: architecture {spec.architecture!r} is not supported; it runs {', '.join(ARCHITECTURES)}")
        check_device(options.device)
        self.decode_batches = buckets.decode_batches(options.extra.get("decode_batches"), "jax")
        self.precompile = buckets.precompile_batches(options.extra.get("precompile"), self.decode_batches, "jax")
        layers = options.extra.get("layers", "unroll")
        if layers not in ("unroll", "scan"):
            raise UnsupportedConfigError(f"jax backend: layers {layers!r} is not unroll or scan")
        extend = options.extra.get("extend", "layered" if layers == "unroll" else "whole")
        if extend not in ("layered", "whole") or (extend == "layered" and layers != "unroll"):
            raise UnsupportedConfigError(f"jax backend: extend {extend!r} is not layered (with layers=unroll) or whole")
        moe = options.extra.get("moe", "auto")
        if moe not in MOE:
            raise UnsupportedConfigError(f"jax backend: moe {moe!r} is not {', '.join(MOE)}")
        self.shard = Shard.of(spec, options.parallel)
        self.placement = place(options.parallel)  # joins JAX's world first when tp > 1
        configure()
        use_compile_cache(options.extra.get("compile_cache"))
        self.spec = spec
        self.decoder = ARCHITECTURES[spec.architecture](self.shard, self.placement.collectives, scan=layers == "scan")
        self.decoder.moe_gather = MOE[moe]
        self.weights = self.placement.weights(self.decoder.arrange(weights))
        self._body = self.placement.jit(self.decoder.body, sharded=(0, 1, 2))
        self._head = self.placement.jit(self.decoder.head, sharded=(0, 1))
        self.layered = extend == "layered"
        self._start = self.placement.jit(self.decoder.start, sharded=(0,))
        self._layer = {kind: self.placement.jit(functools.partial(self.decoder.layer, moe_layer=kind), sharded=(0, 1, 2, 3, 4, 5))
                       for kind in (False, True)}  # fmt: skip
        self._capturing: dict[tuple[int, ...], object] = {}  # capture -> the body returning those layers' inputs too
        self._buckets: set[tuple] = set()  # the body's shape buckets run so far
        self._first = True

    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: JaxKVCache) -> torch.Tensor:
        return self._forward(input_ids, meta, cache, ())[0]

    def forward_hidden(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: JaxKVCache, *, capture: Sequence[int] = (),
                       hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """spi.ModelRunner.forward_hidden of a target model: the logits and the captured layers'
        inputs. One process with unrolled layers (the defaults): under TP or layers=scan, capture
        is refused."""
        if hidden is not None:
            raise ValueError(f"hidden was given to a {self.spec.architecture} target; only an EAGLE3 draft takes hidden states")
        check_capture(capture, self.spec.num_layers)
        if capture and (self.decoder.scan or self.shard.parallel.tp_size > 1):
            raise UnsupportedConfigError("jax backend: capturing hidden states (EAGLE3) needs layers=unroll (the default) and "
                                         "tp_size 1")  # fmt: skip
        return self._forward(input_ids, meta, cache, tuple(capture))

    def _forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: JaxKVCache, capture: tuple[int, ...]):
        """(logits [N, V], the captured layers' inputs [T, H * len(capture)] float32 or None)."""
        if self._first:
            self._first = False
            if self.precompile is not None:
                self._compile_ahead(cache)
        T, wanted, slots = meta.num_tokens, len(meta.logits_indices), meta.out_cache_loc
        batch = buckets.fit(meta.batch_size, self.decode_batches) if meta.one_token_each else None
        if batch is not None:
            meta, input_ids = meta.padded_decode(input_ids, batch)
        inputs, tokens = attention.plan(meta, decode=batch is not None)
        ids, positions = _pad(input_ids, tokens), _pad(meta.positions, tokens)
        rows = _pad(meta.logits_indices, buckets.power_of_two(len(meta.logits_indices)))
        p, start = self.placement, time.perf_counter()
        if batch is None and self.layered:
            hidden, k, v, taken = self._layers(cache, p.replicate(ids), p.replicate(positions), p.replicate(inputs), capture)
            k, v = [p.local(x)[:T] for x in k], None if v is None else [p.local(x)[:T] for x in v]
        else:
            if capture and capture not in self._capturing:
                self._capturing[capture] = p.jit(functools.partial(self.decoder.body, capture=capture), sharded=(0, 1, 2))
            body = self._capturing[capture] if capture else self._body
            hidden, k, v, *taken = body(self.weights, *p.pools(cache), p.replicate(ids), p.replicate(positions), p.replicate(inputs))
            k, v = p.local(k)[:, :T], None if v is None else p.local(v)[:, :T]
            taken = taken[0] if taken else None
        logits = self._head(self.weights, hidden, p.replicate(rows))
        cache.write_layers(slots, k, v)
        out = p.local(logits)[:wanted]
        kind = "decode" if batch is not None else "extend"
        bucket = (kind, tokens, *attention.bucket(inputs))
        if bucket not in self._buckets:  # (kind, tokens, ...): a new program of the body (the head's are small)
            self._buckets.add(bucket)
            logger.info("sglang-fx jax: %s step of %d tokens compiled and ran in %.1f s (bucket %s)", kind, T,
                        time.perf_counter() - start, bucket)  # fmt: skip
        return out, None if taken is None else p.local(taken)[:T]

    def _layers(self, cache: JaxKVCache, ids, positions, inputs, capture: tuple[int, ...] = ()) -> tuple:
        """A layered step: (hidden, every layer's new K, every layer's new V or None, the `capture`
        layers' inputs [tokens, H * n] float32 or None), per rank."""
        k_pools, v_pools = self.placement.pools(cache)
        x, cos, sin = self._start(self.weights, ids, positions)
        ks, vs, taken = [], [], []
        for i, w in enumerate(self.weights["layers"]):
            if i in capture:
                taken.append(x)
            x, k, v = self._layer[self.spec.is_moe_layer(i)](w, k_pools[i], None if v_pools is None else v_pools[i], x, cos, sin, inputs)
            ks.append(k)
            vs.append(v)
        return x, ks, None if v_pools is None else vs, _concat(taken) if taken else None

    def apply_linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The optional probe of spi.ModelRunner: the linear `name` (HF module name) as this runner
        holds it, on x [T, in] float32 torch (cast to the model's dtype) -> float32 [T, out], as
        one compiled program like the step's. One process only (the weights of a TP rank are global
        arrays)."""
        if self.shard.parallel.tp_size > 1:
            raise UnsupportedConfigError("jax backend: apply_linear probes a one-process runner, not a tensor-parallel rank")
        w = self.decoder.linear_weight(self.weights, name)
        y = _linear(self.placement.exchange.from_torch(x.to(self.spec.dtype).contiguous()), w)
        return torch.from_dlpack(y).float()

    def _compile_ahead(self, cache: JaxKVCache) -> None:
        """Run a dummy prefill and one dummy decode step per `precompile` batch size, on the first
        forward: the pool holds no K/V yet, so their writes (page 0) touch nothing a sequence owns."""
        for label, meta in buckets.warmup_steps(cache.layout.page_size, self.precompile):
            start = time.perf_counter()
            self.forward(torch.zeros(meta.num_tokens, dtype=torch.int64), meta, cache)
            logger.info("sglang-fx jax: %s compiled in %.1f s", label, time.perf_counter() - start)


_linear = jax.jit(linear)  # `apply_linear`, compiled per shape as the step is
_concat = jax.jit(lambda xs: jnp.concatenate(xs, axis=1).astype(jnp.float32))  # captured layer inputs -> [T, H * n]


def _pad(t: torch.Tensor, n: int) -> np.ndarray:
    """[k] int torch tensor -> [n] int32 numpy, zero-padded (k <= n)."""
    out = np.zeros(n, np.int32)
    out[: len(t)] = t.numpy()
    return out
