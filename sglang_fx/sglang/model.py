"""The one torch.nn.Module SGLang's ModelRunner calls for an sglang-fx backend.

SGLang builds it as `cls(config=hf_config, quant_config=..., prefix=...)` under the model's
dtype and device, calls `load_weights(...)`, sizes and allocates its KV pools, then calls
`forward(input_ids, positions, forward_batch)` once per step. This module is the only place
that reads ForwardBatch; SGLang lookups that move between versions live in `compat`.

Under SGLang's tensor parallelism every TP rank builds one, for its own shard
(`sglang_fx.sharding`), its layout read from SGLang's published parallel state
(`compat.parallel_layout`); its KV pool holds the rank's KV heads, as SGLang sized it.

Per step: ForwardBatch -> ForwardMetadata (a few small index tensors; the KV cache is never
copied) -> backend runner -> float32 logits for the tokens SGLang needs -> LogitsProcessorOutput.

EAGLE3 (SGLang's EAGLE v2 worker, speculative/eagle_worker_v2.py), through the runner's
`forward_hidden` (SPI 1.4), the surface of SGLang's own LlamaForCausalLM / LlamaForCausalLMEagle3:
- the target: `set_eagle3_layers_to_capture` (called by SGLang's model runner with the draft's
  eagle_aux_hidden_state_layer_ids) picks the layers to capture; every step in which SGLang asks
  for hidden states (prefill and TARGET_VERIFY: all tokens) returns that capture [T, H * n] in
  LogitsProcessorOutput.hidden_states; `get_embed_and_head` hands the draft the target's
  embedding and head (torch tensors, kept from loading for this);
- the draft (an EAGLE3 checkpoint): its runner is built once the worker has given it the
  target's embedding (`set_embed`, or `set_embed_and_head` when it has no head of its own,
  `load_lm_head_from_target`); each step takes `spec_info.hidden_states` in (the target's
  capture, or its own previous output) and returns draft-vocabulary logits and its own hidden
  out; `hot_token_id` (from d2t) is the map SGLang's worker applies to draft ids.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from .. import eagle3
from ..checkpoint import Checkpoint, load_spec
from ..errors import UnsupportedConfigError
from ..kv_pool import layout_for
from ..metadata import ForwardMetadata, ForwardMode
from ..registry import Backend, load_backend
from ..sharding import Shard
from ..spi import KVCache, ModelRunner, RunnerOptions
from . import backend_options, compat, peer_watch

logger = logging.getLogger(__name__)


class SglangFxForCausalLM(torch.nn.Module):
    """A causal LM run by the sglang-fx backend `backend_name` (set on per-backend subclasses
    made by `model_class`)."""

    backend_name: str = ""
    #: True for a speculative draft model (run by SGLang's draft worker; `model_class(..., draft=True)`).
    is_draft: bool = False
    #: An EAGLE3 draft's [draft_vocab] target id of each draft id (SGLang's worker maps the draft's
    #: choices through it), None otherwise; and whether it scores with the target's head.
    hot_token_id: torch.Tensor | None = None
    load_lm_head_from_target: bool = False

    def __init__(self, config: Any, quant_config: Any = None, prefix: str = "", **_: Any) -> None:
        super().__init__()
        if quant_config is not None:
            raise UnsupportedConfigError(
                f"sglang-fx backend {self.backend_name!r} got SGLang's quantization config "
                f"({type(quant_config).__name__}): the plugin hook serve_quantized_at_any_dtype (sglang_fx/sglang/quantization.py) "
                f"was not applied; check that the sglang-fx plugin is registered (sglang.srt.plugins)"
            )
        self.config = config
        self.backend: Backend = load_backend(self.backend_name)
        self.model_path = compat.model_path(config, self.is_draft)
        self.device = compat.construction_device()
        self.spec = load_spec(self.model_path, compat.construction_dtype())
        self.parallel = compat.parallel_layout(self.device)
        self.backend.check(architecture=self.spec.architecture, dtype=self.spec.dtype_name, device=self.device,
                           tp_size=self.parallel.tp_size, ep_size=self.parallel.ep_size,
                           quantization=self.spec.quant.scheme if self.spec.quant else None)  # fmt: skip
        self.shard = Shard.of(self.spec, self.parallel)
        if self.parallel.tp_size > 1:
            peer_watch.watch(list(self.parallel.tp.ranks), self.parallel.tp.name)
        self.runner: ModelRunner | None = None
        self.cache: KVCache | None = None
        self.capture: tuple[int, ...] = ()  # an EAGLE3 target's captured layers (set_eagle3_layers_to_capture)
        self._shareable: dict[str, torch.Tensor] | None = None  # an EAGLE3 target's embedding and head
        self._draft_own: dict[str, torch.Tensor] | None = None  # an EAGLE3 draft's own weights, until set_embed
        self._kv_identity: tuple | None = None
        self.logits_processor = compat.backend_logits_processor(config)
        logger.info(
            "sglang-fx: %s from %s on backend %r (%s %s), %s on %s, %s", self.spec.architecture, self.model_path,
            self.backend_name, self.backend.info.framework, self.backend.info.framework_version,
            self.spec.dtype_name, self.device, self.parallel.describe())

    # ----------------------------------------------------------------------------------------
    # Loading
    # ----------------------------------------------------------------------------------------

    def load_weights(self, weights: Any = None) -> None:
        """Read the checkpoint through sglang_fx.checkpoint and build the backend's runner, so
        its weights are placed before SGLang measures the memory left for the KV pool.
        SGLang's own weight iterator is not consumed (the backend gets HF-named tensors from
        `Checkpoint.load`)."""
        loaded = Checkpoint(self.model_path).load(self.spec, self.shard)  # this rank's slices only
        if self.spec.eagle3 is not None:  # an EAGLE3 draft: the runner waits for the target's embedding
            self._draft_own = loaded
            self.hot_token_id = eagle3.hot_token_ids(loaded["d2t"]) if "d2t" in loaded else None
            self.load_lm_head_from_target = self.spec.eagle3.head_from_target
            return
        if not self.is_draft and compat.speculative_algorithm() == "EAGLE3":
            self._shareable = {k: loaded[k] for k in eagle3.SHAREABLE if k in loaded}
        self.runner = self.backend.runner(self.spec, loaded, self._options())

    def _options(self) -> RunnerOptions:
        return RunnerOptions(device=self.device, extra=backend_options(self.backend_name), parallel=self.parallel)

    # ----------------------------------------------------------------------------------------
    # EAGLE3: what SGLang's EAGLE v2 worker and model runner call (see the module docstring)
    # ----------------------------------------------------------------------------------------

    def set_eagle3_layers_to_capture(self, layer_ids: list[int] | None = None) -> None:
        """SGLang's model runner, for an EAGLE3 target (attention_backend_setup.py:61): layer_ids
        are the draft's eagle_aux_hidden_state_layer_ids (None: SGLang's default layers)."""
        if self.spec.eagle3 is not None or not self.backend.info.capabilities.eagle3:
            raise UnsupportedConfigError(f"sglang-fx backend {self.backend_name!r} cannot capture hidden states for EAGLE3 "
                                         f"here ({self.spec.architecture}; Capabilities.eagle3 {self.backend.info.capabilities.eagle3})")  # fmt: skip
        self.capture = eagle3.capture_layers(self.spec.num_layers, layer_ids)
        logger.info("sglang-fx: EAGLE3 target captures the inputs of layers %s", list(self.capture))

    def get_embed_and_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's (embedding [V, H], lm_head [V, H]) for its EAGLE3 draft (eagle_worker_v2.py:init_lm_head)."""
        if self._shareable is None:
            raise UnsupportedConfigError(f"sglang-fx backend {self.backend_name!r}: the target keeps its embedding and head "
                                         "only when the server runs --speculative-algorithm EAGLE3")  # fmt: skip
        return self._shareable["model.embed_tokens.weight"], self._shareable["lm_head.weight"]

    def set_embed(self, embed: torch.Tensor) -> None:
        """SGLang's EAGLE3 worker gives the draft its target's embedding (the draft keeps its own
        when the hidden sizes differ, as SGLang's does: `eagle3.draft_weights`); builds the runner."""
        self._build_draft({"model.embed_tokens.weight": embed})

    def set_embed_and_head(self, embed: torch.Tensor, head: torch.Tensor) -> None:
        """`set_embed`, and the target's head for a draft without one (load_lm_head_from_target)."""
        self._build_draft({"model.embed_tokens.weight": embed, "lm_head.weight": head})

    def _build_draft(self, target: dict[str, torch.Tensor]) -> None:
        if self.spec.eagle3 is None or self._draft_own is None:
            raise UnsupportedConfigError(f"sglang-fx: only a loaded EAGLE3 draft takes its target's embedding; this is a "
                                         f"{self.spec.architecture} (runner built: {self.runner is not None})")  # fmt: skip
        try:
            weights = eagle3.draft_weights(self.spec, self._draft_own, target)
        except ValueError as e:
            raise UnsupportedConfigError(f"the EAGLE3 draft {self.model_path}: {e}") from None
        self._draft_own = None
        self.runner = self.backend.runner(self.spec, weights, self._options())

    def _bind(self) -> KVCache:
        """Alias SGLang's KV buffers, on the first step (SGLang sizes its pools after loading
        the model), and again only if SGLang reallocated them."""
        pool = compat.token_to_kv_pool()
        if self.cache is not None and compat.kv_identity(pool) == self._kv_identity:
            return self.cache
        k, v, page_size = compat.kv_buffers(pool)
        num_slots = k[0].shape[0]
        if num_slots % page_size:
            raise UnsupportedConfigError(f"SGLang's KV pool has {num_slots} slots, not whole pages of {page_size}")
        layout = layout_for(self.shard.local, num_pages=num_slots // page_size, page_size=page_size, dtype=k[0].dtype)
        found = (len(k), tuple(k[0].shape[1:]), None if v is None else tuple(v[0].shape[1:]))
        if found != (layout.num_layers, layout.k_shape, layout.v_shape):
            raise UnsupportedConfigError(
                f"SGLang's KV pool has {found[0]} layers of K {found[1]} and V {found[2]} per token, the model "
                f"needs {layout.num_layers} of K {layout.k_shape} and V {layout.v_shape}"
            )
        if self.runner is None:
            if self.spec.eagle3 is not None:
                raise UnsupportedConfigError(f"the EAGLE3 draft {self.model_path} ran before SGLang's worker gave it the "
                                             "target's embedding (set_embed); it runs only under --speculative-algorithm EAGLE3")  # fmt: skip
            self.load_weights()
        self.cache = self.backend.kv_cache(layout, k, v, self.device)
        self._kv_identity = compat.kv_identity(pool)
        return self.cache

    # ----------------------------------------------------------------------------------------
    # One step
    # ----------------------------------------------------------------------------------------

    # no_grad, not inference_mode: SGLang's sampler updates the returned logits in place
    # (`logits.div_(temperatures)`) outside inference mode, which an inference tensor refuses.
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any, **kwargs: Any):
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise UnsupportedConfigError(
                f"sglang-fx backend {self.backend_name!r} got {unsupported}: input embeddings and "
                "pipeline parallelism are not supported"
            )
        mode = forward_batch.forward_mode
        if mode.is_idle():
            vocab = self.spec.eagle3.draft_vocab_size if self.spec.eagle3 is not None else self.spec.vocab_size
            return compat.logits_output(torch.empty((0, vocab), dtype=torch.float32, device=input_ids.device))
        cache = self._bind()
        all_logits = not self.is_draft and not mode.is_target_verify() and compat.wants_input_logprobs(forward_batch)
        meta = to_metadata(forward_batch, positions, compat.req_to_token(), cache.layout.page_size, all_logits,
                           draft=self.is_draft)  # fmt: skip
        if meta.mode is ForwardMode.VERIFY and not self.backend.info.capabilities.verify:
            raise UnsupportedConfigError(f"sglang-fx backend {self.backend_name!r} declares no verify steps "
                                         "(Capabilities.verify): serve it without speculative decoding")  # fmt: skip
        ids, wanted = input_ids.to(torch.int64), compat.hidden_wanted(forward_batch)
        if self.spec.eagle3 is not None:  # an EAGLE3 draft: hidden states in (the worker's) and out
            hidden_in = compat.draft_hidden_in(forward_batch)
            hidden_in = None if hidden_in is None else hidden_in.to(torch.float32)
            logits, hidden = self.runner.forward_hidden(ids, meta, cache, hidden=hidden_in)
        elif wanted and self.capture:  # an EAGLE3 target: the captured layers' inputs
            logits, hidden = self.runner.forward_hidden(ids, meta, cache, capture=self.capture)
        else:
            logits, hidden = self.runner.forward(ids, meta, cache), None  # [N, V] float32
        if hidden is not None and wanted == "last":  # the last new token of each sequence
            hidden = hidden[torch.cumsum(meta.extend_lens, 0, dtype=torch.int64) - 1]
        hidden = hidden if wanted else None
        if all_logits:
            out = self.logits_processor(input_ids, logits, None, forward_batch)
            out.hidden_states = hidden
            return out
        return compat.logits_output_with_hidden(logits, hidden)


def to_metadata(
    fb: Any, positions: torch.Tensor, req_to_token: torch.Tensor, page_size: int, all_logits: bool = False,
    draft: bool = False,
) -> ForwardMetadata:
    """ForwardMetadata of one SGLang step. Decode: one new token per sequence, seq_lens
    already counting it. Extend (and mixed): extend_seq_lens new tokens after
    extend_prefix_lens cached ones. Target verify: see `verify_metadata`. Only index tensors
    are built; the KV cache is untouched.

    A draft model's steps (`draft`, SGLang's EAGLE-style draft worker, which STANDALONE uses):
    DRAFT_EXTEND_V2 is an EXTEND of the verify window (D tokens per request after its committed
    ones) with logits for every token (SGLang picks the last accepted one per request); a draft
    DECODE step i feeds one token per request at positions[b] = committed + i, whose slot and the
    i earlier draft tokens' slots SGLang placed in req_to_token, while fb.seq_lens stays the
    committed length: the token sees req_to_token[b, :positions[b] + 1]."""
    mode = fb.forward_mode
    if mode.name == "TARGET_VERIFY":
        return verify_metadata(fb, positions, req_to_token, page_size)
    if mode.name == "DRAFT_EXTEND_V2":
        all_logits = True
    elif mode.name not in ("EXTEND", "MIXED", "DECODE"):
        raise UnsupportedConfigError(
            f"sglang-fx does not run SGLang forward mode {mode.name} (EAGLE-style drafting with hidden states, split "
            "prefill and diffusion LLMs are not supported)"
        )
    device = positions.device
    lens = fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens.cpu()
    seq_lens_cpu = tuple(int(x) for x in lens.tolist())
    batch = len(seq_lens_cpu)
    seq_lens = fb.seq_lens.to(torch.int32)
    if draft and mode.is_decode():  # draft decode step: lengths from the tokens' positions
        seq_lens = (positions + 1).to(torch.int32)
        seq_lens_cpu = tuple(int(x) + 1 for x in positions.cpu().tolist())
    if mode.is_decode():
        extend_cpu = (1,) * batch
        prefix_cpu = tuple(n - 1 for n in seq_lens_cpu)
        extend_lens = torch.ones(batch, dtype=torch.int32, device=device)
        prefix_lens = seq_lens - 1
        logits_indices = torch.arange(batch, dtype=torch.int64, device=device)
        meta_mode = ForwardMode.DECODE
    else:
        extend_cpu = tuple(int(x) for x in fb.extend_seq_lens_cpu)
        prefix_cpu = tuple(int(x) for x in fb.extend_prefix_lens_cpu)
        extend_lens = fb.extend_seq_lens.to(torch.int32)
        prefix_lens = fb.extend_prefix_lens.to(torch.int32)
        if all_logits:
            logits_indices = torch.arange(sum(extend_cpu), dtype=torch.int64, device=device)
        else:
            logits_indices = torch.cumsum(extend_lens, 0, dtype=torch.int64) - 1
        meta_mode = ForwardMode.EXTEND
    width = max(seq_lens_cpu)
    return ForwardMetadata(
        mode=meta_mode,
        positions=positions.to(torch.int64),
        out_cache_loc=fb.out_cache_loc.to(torch.int64),
        seq_lens=seq_lens,
        prefix_lens=prefix_lens,
        extend_lens=extend_lens,
        req_to_token=req_to_token[fb.req_pool_indices, :width],
        logits_indices=logits_indices,
        page_size=page_size,
        seq_lens_cpu=seq_lens_cpu,
        prefix_lens_cpu=prefix_cpu,
        extend_lens_cpu=extend_cpu,
    )


def verify_metadata(fb: Any, positions: torch.Tensor, req_to_token: torch.Tensor, page_size: int) -> ForwardMetadata:
    """The VERIFY step of SGLang's TARGET_VERIFY: each of the B requests has seq_lens[b]
    committed tokens and D = spec_info.draft_token_num draft tokens, whose slots SGLang already
    wrote into req_to_token after the committed ones and into out_cache_loc; positions are
    SGLang's (committed length + tree depth); spec_info.custom_mask is the draft-only tree mask
    [B * D * D] bool on CPU. With the full mask of other devices ([sum_b D * (seq_lens[b] + D)],
    the committed part all ones) its draft columns are taken. Logits for all B * D tokens."""
    spec = fb.spec_info
    draft = int(spec.draft_token_num)
    lens = fb.seq_lens_cpu if fb.seq_lens_cpu is not None else fb.seq_lens.cpu()
    committed = tuple(int(x) for x in lens.tolist())
    batch, device = len(committed), positions.device
    mask = spec.custom_mask.to(torch.bool).flatten()
    if mask.numel() == sum(draft * (n + draft) for n in committed):  # full mask: [D, n + D] per request
        rows, start = [], 0
        for n in committed:
            rows.append(mask[start : start + draft * (n + draft)].view(draft, n + draft)[:, n:].flatten())
            start += draft * (n + draft)
        mask = torch.cat(rows)
    if mask.numel() < batch * draft * draft:
        raise UnsupportedConfigError(f"TARGET_VERIFY's custom_mask has {mask.numel()} entries; sglang-fx expects the "
                                     f"draft-only tree mask of {batch} requests x {draft}x{draft} draft tokens")  # fmt: skip
    seq_lens = fb.seq_lens.to(torch.int32)
    return ForwardMetadata(
        mode=ForwardMode.VERIFY,
        positions=positions.to(torch.int64),
        out_cache_loc=fb.out_cache_loc.to(torch.int64),
        seq_lens=seq_lens + draft,
        prefix_lens=seq_lens,
        extend_lens=torch.full((batch,), draft, dtype=torch.int32, device=device),
        req_to_token=req_to_token[fb.req_pool_indices, : max(committed) + draft],
        logits_indices=torch.arange(batch * draft, dtype=torch.int64, device=device),
        page_size=page_size,
        seq_lens_cpu=tuple(n + draft for n in committed),
        prefix_lens_cpu=committed,
        extend_lens_cpu=(draft,) * batch,
        tree_mask=mask[: batch * draft * draft],
    )


@functools.cache
def model_class(backend_name: str, draft: bool = False) -> type[SglangFxForCausalLM]:
    """The model class SGLang builds for `--model-impl backend_name` (one per backend, so the
    class name in SGLang's logs names the backend), or for a speculative draft model on it."""
    name = "SglangFx_" + "".join(c if c.isalnum() else "_" for c in backend_name) + ("_Draft" if draft else "") + "_ForCausalLM"
    return type(name, (SglangFxForCausalLM,), {"backend_name": backend_name, "is_draft": draft, "__module__": __name__})
