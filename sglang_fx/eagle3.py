"""EAGLE3's model side, framework-neutral (SPI 1.4): which target layers are captured, the draft's
weights completed from its target, its draft -> target token ids, and its computation.

Capture (a target step, `ModelRunner.forward_hidden(capture=...)`): SGLang's `layers_to_capture`
convention (models/llama.py, `set_eagle3_layers_to_capture`): capturing layer i takes the
residual stream entering layer i, i.e. the output of layer i - 1 (transformers'
`output_hidden_states[i]`). A draft trained on the outputs of layers `aux_layer_ids` therefore
captures layers [j + 1 for j in aux_layer_ids]; with none given SGLang captures layers
(2, L // 2, L - 3). The captures are concatenated in layer order: [T, H * n].

The draft (`LlamaForCausalLMEagle3`, SGLang's models/llama_eagle3.py), on new tokens x [T] with
hidden h [T, n * Ht] (a capture) or [T, H] (its own previous output), norms RMSNorm with eps:
    h = fc(h) if h is n * Ht wide                          # [T, H]
    a = attention(concat(norm_in(embed(x)), norm_hidden(h)))   # q/k/v read 2H; RoPE; causal over
                                                           # the draft's own KV cache; o_proj -> H
    r = h + a
    r = r + mlp(norm_post(r))                              # SwiGLU
    logits = lm_head(norm(r))                              # [N, draft_vocab] (rows logits_indices)
    hidden_out = r                                         # [T, H], fed to the next draft step
Draft id d is target id d + d2t[d] (`hot_token_ids`). The embedding is the target's (SGLang's
`set_embed` replaces even a draft's own, unless their hidden sizes differ), and so is the head
when config.json names no draft_vocab_size (`set_embed_and_head`); `draft_weights` does the same,
sharing the target's tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .checkpoint import Checkpoint, ModelSpec, load_spec

#: A target's tensors an EAGLE3 draft may share (`draft_weights`): what a target keeps for it.
SHAREABLE = ("model.embed_tokens.weight", "lm_head.weight")


def capture_layers(num_layers: int, aux_layer_ids: Sequence[int] | None = None) -> tuple[int, ...]:
    """The target layers to capture (SGLang's `set_eagle3_layers_to_capture`) for a draft trained on
    the outputs of layers `aux_layer_ids` (its `Eagle3Spec.aux_layer_ids`), or SGLang's default;
    in layer order, each once, as SGLang's layer loop captures them whatever the ids' order."""
    wanted = (2, num_layers // 2, num_layers - 3) if aux_layer_ids is None else tuple(j + 1 for j in aux_layer_ids)
    wanted = tuple(sorted(set(wanted)))
    check_capture(wanted, num_layers)
    return wanted


def check_capture(capture: Sequence[int], num_layers: int) -> None:
    """ValueError unless capture is strictly increasing layer indices in [0, num_layers)."""
    c = list(capture)
    if any(not 0 <= i < num_layers for i in c) or c != sorted(set(c)):
        raise ValueError(f"capture {c} must be strictly increasing layer indices in [0, {num_layers}) (the residual stream "
                         f"entering each); an EAGLE3 draft trained on layer j's output captures j + 1 "
                         f"(sglang_fx.eagle3.capture_layers)")  # fmt: skip


def check_draft_hidden(spec: ModelSpec, hidden: torch.Tensor | None, num_tokens: int, capture: Sequence[int]) -> bool:
    """ValueError unless `hidden` fits the EAGLE3 draft `spec` for a step of num_tokens; True when
    it is a target's capture (fc projects it), False when it is the draft's own [T, H] output."""
    e = spec.eagle3
    if capture:
        raise ValueError(f"capture {list(capture)} was asked of an EAGLE3 draft; only a target model captures hidden states")
    widths = (e.num_aux * e.target_hidden_size, spec.hidden_size)
    if hidden is None or hidden.dim() != 2 or hidden.shape[0] != num_tokens or hidden.shape[1] not in widths:
        got = "None" if hidden is None else str(list(hidden.shape))
        raise ValueError(f"an EAGLE3 draft step of {num_tokens} tokens needs hidden [{num_tokens}, {widths[0]}] (the target's "
                         f"capture of {e.num_aux} layers) or [{num_tokens}, {widths[1]}] (its own previous output), got {got}")  # fmt: skip
    return hidden.shape[1] == widths[0] and widths[0] != widths[1]


def refuse_plain_forward(spec: ModelSpec):
    """The error a draft runner's plain `forward` raises."""
    return ValueError(f"{spec.architecture} is an EAGLE3 draft: it needs the target's hidden states; call "
                      "forward_hidden(input_ids, meta, cache, hidden=...) (sglang_fx/spi.py)")  # fmt: skip


def draft_weights(spec: ModelSpec, weights: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The draft's weights (`Checkpoint.load`) completed from its target's as SGLang's EAGLE3
    worker does: the target's embedding (its "model.embed_tokens.weight" tensor itself) in place of
    the draft's own unless their hidden sizes differ; with `head_from_target`, the target's
    lm_head too; an identity d2t where the checkpoint has none."""
    e, out = spec.eagle3, dict(weights)
    if e.target_hidden_size == spec.hidden_size:
        out["embed_tokens.weight"] = target["model.embed_tokens.weight"]
    elif "embed_tokens.weight" not in out:
        raise ValueError(f"the EAGLE3 draft's hidden size {spec.hidden_size} differs from its target's {e.target_hidden_size}, so "
                         "it cannot share the target's embedding; its checkpoint must carry embed_tokens.weight")  # fmt: skip
    if e.head_from_target:
        out["lm_head.weight"] = target["lm_head.weight"]
    elif "lm_head.weight" not in out:
        raise ValueError(f"the EAGLE3 draft has a draft vocabulary of {e.draft_vocab_size} (draft_vocab_size in config.json) "
                         "but no lm_head.weight; its checkpoint must carry its head, or its config no draft_vocab_size")  # fmt: skip
    if "d2t" not in out:
        out["d2t"] = torch.zeros(e.draft_vocab_size, dtype=torch.int64)
    if out["embed_tokens.weight"].shape != (spec.vocab_size, spec.hidden_size):
        raise ValueError(f"the target's embedding is {list(out['embed_tokens.weight'].shape)}, and the draft needs "
                         f"[{spec.vocab_size}, {spec.hidden_size}]: is it the draft of this target?")  # fmt: skip
    return out


def load_draft(path: str | Path, target: Mapping[str, torch.Tensor], dtype: str | torch.dtype | None = None) -> tuple[ModelSpec, dict]:
    """(spec, complete weights) of the EAGLE3 draft checkpoint at `path` for a target whose
    weights are `target`; ValueError when `path` is not an EAGLE3 draft."""
    spec = load_spec(path, dtype)
    if spec.eagle3 is None:
        raise ValueError(f"{path} is a {spec.architecture}, not an EAGLE3 draft (LlamaForCausalLMEagle3)")
    return spec, draft_weights(spec, Checkpoint(path).load(spec), target)


def hot_token_ids(d2t: torch.Tensor) -> torch.Tensor:
    """[draft_vocab] int64: the target id of each draft id (SGLang's `hot_token_id`)."""
    return d2t.long() + torch.arange(len(d2t), device=d2t.device)
