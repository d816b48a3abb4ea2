"""What one rank holds of a model under tensor and expert parallelism: the sharding rules, once,
framework-neutral. `Checkpoint.load(spec, shard)` reads only these slices from the safetensors
files; a backend builds its model from `Shard.local` (local head counts and widths) and the
sliced weights, and adds the collectives below. Every rank computes the same logits.

The rules (HF tensor names; TP size t, rank r; D head dim):
- Attention, split by head. q_proj (and its bias) by rows, Hq/t heads per rank; k_proj and
  v_proj (and biases) by rows, Hkv/t heads per rank, or, when t > Hkv, the one KV head whose
  query group holds this rank's query heads (KV heads replicated t/Hkv times, as SGLang does);
  o_proj by columns, then all-reduce. q_norm/k_norm (per head, shared weight) are replicated.
  MLA (DeepSeek): q_proj / q_b_proj and kv_b_proj by rows per head, o_proj by columns; the
  latent projections (q_a_proj, kv_a_proj_with_mqa) and their norms are replicated, and so is
  the latent KV cache (one latent per token, every rank needs all of it).
- Dense MLP: gate_proj and up_proj by rows, down_proj by columns, then all-reduce.
- Routed experts: expert e lives on EP rank e // (E / ep_size); inside it gate/up rows and
  down columns are split tp/ep_size ways. A rank reads only its experts. The router (gate,
  e_score_correction_bias) is replicated, so every rank routes every token alike; each rank
  applies only the experts it holds, and the partial sums are all-reduced over the TP group.
  Shared experts are split like a dense MLP over the whole TP group.
- Vocabulary-parallel embedding and lm_head (rows split in ceil(V/t) blocks, the last padded with
  zero rows): each rank reads 1/t of the two largest tensors of a small model. The embedding
  gives zero rows for tokens outside the rank's block, and an all-reduce (a sum with zeros,
  exact) completes it; the lm_head's [N, ceil(V/t)] logits are all-gathered and cut to V. Both
  collectives are exact, so the logits differ from tp=1 only by the row-parallel sums' rounding.
- Norms and everything else: replicated.

Collectives per step: one all-reduce after the embedding, one after each attention block, one
after each MLP/MoE; one all-gather of the logits. All are over the TP group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .checkpoint import ModelSpec, expected_weights
from .errors import UnsupportedConfigError
from .parallel import SINGLE, Parallel

Split = tuple[int, range]  # (dimension, the elements of it this rank reads)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def problems(spec: ModelSpec, tp_size: int, ep_size: int = 1) -> list[str]:
    """Every reason `spec` cannot be split tp_size ways (experts ep_size ways), as sentences naming
    the fix; empty when it can."""
    out = []
    if tp_size < 1 or ep_size < 1:
        return [f"tp_size ({tp_size}) and ep_size ({ep_size}) must be positive"]
    if spec.eagle3 is not None and tp_size > 1:
        out.append(f"an EAGLE3 draft ({spec.architecture}) runs unsharded; use tp_size 1 for it")
    if tp_size % ep_size:
        out.append(f"ep_size {ep_size} must divide tp_size {tp_size} (experts are split over the TP group)")
    if spec.num_heads % tp_size:
        out.append(f"tp_size {tp_size} does not divide the {spec.num_heads} attention heads of {spec.architecture}; "
                   f"use a tp_size among {_divisors(spec.num_heads)}")  # fmt: skip
    if spec.mla is None and spec.num_kv_heads % tp_size and tp_size % spec.num_kv_heads:
        out.append(f"tp_size {tp_size} neither divides nor is a multiple of the {spec.num_kv_heads} KV heads")
    dense = spec.moe is None or len(spec.moe.dense_layers) > 0
    if dense and spec.intermediate_size % tp_size:
        out.append(f"tp_size {tp_size} does not divide the MLP width {spec.intermediate_size}")
    if spec.moe is not None and not tp_size % ep_size:
        m, moe_tp = spec.moe, tp_size // ep_size
        if m.num_experts % ep_size:
            out.append(f"ep_size {ep_size} does not divide the {m.num_experts} routed experts; use an ep_size "
                       f"that divides both {m.num_experts} and tp_size {tp_size}")  # fmt: skip
        if m.intermediate_size % moe_tp:
            out.append(f"tp_size / ep_size = {moe_tp} does not divide the expert width {m.intermediate_size}")
        if m.num_shared_experts and (m.intermediate_size * m.num_shared_experts) % tp_size:
            out.append(f"tp_size {tp_size} does not divide the shared experts' width {m.intermediate_size * m.num_shared_experts}")
    return out


@dataclass(frozen=True)
class Shard:
    """The part of a model (`spec`, as in its checkpoint) that one rank holds under `parallel`.
    Ranges count elements of the split dimension of the HF tensor (heads, channels, rows)."""

    spec: ModelSpec
    parallel: Parallel = SINGLE

    @classmethod
    def of(cls, spec: ModelSpec, parallel: Parallel = SINGLE) -> Shard:
        """The shard, or UnsupportedConfigError naming every reason the model cannot be split so."""
        found = problems(spec, parallel.tp_size, parallel.ep_size)
        if found:
            raise UnsupportedConfigError("; ".join(found))
        return cls(spec, parallel)

    # --- what this rank holds --------------------------------------------------------------------

    @property
    def heads(self) -> range:
        """This rank's query heads."""
        return _block(self.spec.num_heads, self.parallel.tp_size, self.parallel.tp_rank)

    @property
    def kv_heads(self) -> range:
        """This rank's KV heads: Hkv/tp of them, or the single one its query heads read when
        tp > Hkv. MLA: the one latent head, on every rank."""
        s, t, r = self.spec, self.parallel.tp_size, self.parallel.tp_rank
        if s.mla is not None:
            return range(1)
        if t <= s.num_kv_heads:
            return _block(s.num_kv_heads, t, r)
        kv = r // (t // s.num_kv_heads)
        return range(kv, kv + 1)

    @property
    def vocab(self) -> range:
        """This rank's rows of the embedding and lm_head, at most `vocab_block` of them (the last
        rank's block may hold fewer real rows; the loader pads it with zeros)."""
        start = self.parallel.tp_rank * self.vocab_block
        return range(min(start, self.spec.vocab_size), min(start + self.vocab_block, self.spec.vocab_size))

    @property
    def vocab_block(self) -> int:
        """Rows of every rank's embedding and lm_head block: ceil(V / tp)."""
        return -(-self.spec.vocab_size // self.parallel.tp_size)

    @property
    def intermediate(self) -> range:
        """This rank's channels of a dense MLP."""
        return _block(self.spec.intermediate_size, self.parallel.tp_size, self.parallel.tp_rank)

    @property
    def experts(self) -> range:
        """The routed experts this rank holds (a slice of each)."""
        if self.spec.moe is None:
            return range(0)
        return _block(self.spec.moe.num_experts, self.parallel.ep_size, self.parallel.ep_rank)

    @property
    def expert_intermediate(self) -> range:
        """This rank's channels inside each of its experts."""
        return _block(self.spec.moe.intermediate_size, self.parallel.moe_tp_size, self.parallel.moe_tp_rank)

    @property
    def shared_intermediate(self) -> range:
        m = self.spec.moe
        return _block(m.intermediate_size * m.num_shared_experts, self.parallel.tp_size, self.parallel.tp_rank)

    @property
    def local(self) -> ModelSpec:
        """The spec with this rank's sizes: num_heads, num_kv_heads, intermediate_size and
        moe.intermediate_size are local; vocab_size stays global (the runner returns logits over
        the whole vocabulary), and so does moe.num_experts (the router scores every expert)."""
        s = self.spec
        moe = None if s.moe is None else replace(s.moe, intermediate_size=len(self.expert_intermediate))
        kv = s.num_kv_heads if s.mla is not None else len(self.kv_heads)
        return replace(s, num_heads=len(self.heads), num_kv_heads=kv, intermediate_size=len(self.intermediate), moe=moe)

    # --- which slice of each tensor ----------------------------------------------------------------

    def holds(self, name: str) -> bool:
        """Whether this rank reads tensor `name` at all (False only for other ranks' experts)."""
        e = _expert_of(name)
        return e is None or e in self.experts

    def split(self, name: str) -> Split | None:
        """(dim, range) of the HF tensor `name` this rank reads, or None for all of it. A quantized
        linear's per-channel weight_scale [out, 1] splits with its weight's rows (column-parallel)
        and is whole on every rank of a row-parallel one (its output channels are not split)."""
        if self.spec.eagle3 is not None:
            return None  # an EAGLE3 draft runs unsharded (`problems`)
        if name.endswith(".weight_scale"):
            cut = self.split(name.removesuffix("_scale"))
            return cut if cut is not None and cut[0] == 0 else None
        s, leaf = self.spec, ".".join(name.split(".")[-2:])
        proj = leaf.split(".")[0]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return 0, self.vocab
        if ".mlp." in name:
            if ".mlp.experts." in name:
                width = self.expert_intermediate
            elif ".mlp.shared_experts." in name:
                width = self.shared_intermediate
            elif proj in ("gate_proj", "up_proj", "down_proj"):
                width = self.intermediate
            else:
                return None  # the router
            return (1 if proj == "down_proj" else 0), width
        if ".self_attn." not in name:
            return None
        h = self.heads
        if s.mla is not None:
            m = s.mla
            per_head = {"q_proj": m.qk_head_dim, "q_b_proj": m.qk_head_dim, "kv_b_proj": m.qk_nope_head_dim + m.v_head_dim,
                        "o_proj": m.v_head_dim}.get(proj)  # fmt: skip
            if per_head is None:
                return None  # the latent projections and norms
            return (1 if proj == "o_proj" else 0), _channels(h, per_head)
        D = s.head_dim
        if proj == "q_proj":
            return 0, _channels(h, D)
        if proj in ("k_proj", "v_proj"):
            return 0, _channels(self.kv_heads, D)
        if proj == "o_proj":
            return 1, _channels(h, D)
        return None  # q_norm, k_norm

    def expected(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape of every tensor this rank holds (`expected_weights` sliced; the vocab
        blocks padded to vocab_block rows)."""
        out = {}
        for name, shape in expected_weights(self.spec).items():
            if not self.holds(name):
                continue
            cut = self.split(name)
            if cut is not None:
                dim, rows = cut
                n = self.vocab_block if name in ("model.embed_tokens.weight", "lm_head.weight") else len(rows)
                shape = shape[:dim] + (n,) + shape[dim + 1 :]
            out[name] = shape
        return out


def _block(n: int, parts: int, index: int) -> range:
    size = n // parts
    return range(index * size, (index + 1) * size)


def _channels(heads: range, per_head: int) -> range:
    return range(heads.start * per_head, heads.stop * per_head)


def _expert_of(name: str) -> int | None:
    """The routed expert a tensor belongs to (".mlp.experts.E."), or None."""
    marker = ".mlp.experts."
    if marker not in name:
        return None
    return int(name.split(marker, 1)[1].split(".", 1)[0])
