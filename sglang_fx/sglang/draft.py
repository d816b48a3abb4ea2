"""SGLang's draft worker (STANDALONE speculative decoding) with an sglang-fx draft model.

SGLang 0.5.23 runs a draft model through its EAGLE v2 worker (`StandaloneWorkerV2`): a second
ModelRunner for --speculative-draft-model-path (built from the same --model-impl; its backend
comes from `sglang_fx.sglang.draft_backend`), driven step by step: EXTEND after each prefill,
`speculative_num_steps - 1` DECODE steps that draft a chain, DRAFT_EXTEND_V2 over the verify
window after each verification. The adapter maps those to ordinary SPI steps
(`model.to_metadata`, draft=True).

Before that, the worker asks `DraftBackendFactory` for SGLang attention backends for the draft
steps, from a fixed table of GPU and Intel-AMX backends; on a CPU host without sgl_kernel none
can be built ("EAGLE is not supported in decode attention backend torch_native"). An sglang-fx
model computes attention inside its backend and reads no SGLang attention backend, so for a
draft runner whose model is an sglang-fx one, the two factory methods (wrapped AROUND through
SGLang's HookRegistry, see plugin.register) answer:
- decode: `SpiDraftSteps`, one entry per draft step, each the draft runner's own attention
  backend (built by SGLang for the runner; its per-step metadata is not used by the model);
- draft extend: None, which leaves the draft runner's own backend in place (the worker's
  documented "no separate draft-extend backend" case).
Any other draft model goes to SGLang's factory unchanged.
"""

from __future__ import annotations

from typing import Any


def is_sglang_fx_runner(runner: Any) -> bool:
    from .model import SglangFxForCausalLM

    return isinstance(getattr(runner, "model", None), SglangFxForCausalLM)


class SpiDraftSteps:
    """The multi-step draft decode "backend" the EAGLE worker expects: `attn_backends[i]` is
    the ForwardContext backend of draft step i (i < speculative_num_steps - 1), and
    `init_forward_metadata(forward_batch)` prepares all steps at once. The adapter builds each
    step's ForwardMetadata from the ForwardBatch itself, so there is nothing to prepare."""

    def __init__(self, runner: Any, num_steps: int) -> None:
        self.attn_backends = [runner.attn_backend] * max(num_steps - 1, 0)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        return None


def create_decode_backend(original, factory: Any, *args: Any, **kwargs: Any):
    """AROUND DraftBackendFactory.create_decode_backend (see the module docstring)."""
    if not is_sglang_fx_runner(factory.draft_model_runner):
        return original(factory, *args, **kwargs)
    if factory.speculative_num_steps <= 1:  # SGLang's own rule: one draft step needs no backend
        return None
    return SpiDraftSteps(factory.draft_model_runner, factory.speculative_num_steps)


def create_draft_extend_backend(original, factory: Any, *args: Any, **kwargs: Any):
    """AROUND DraftBackendFactory.create_draft_extend_backend (see the module docstring)."""
    if not is_sglang_fx_runner(factory.draft_model_runner):
        return original(factory, *args, **kwargs)
    return None
