"""Speculative decoding through the SPI: SGLang's NGRAM (drafts from each request's own
n-grams, verified as a tree) with --model-impl reference_torch, numpy, mindspore and jax on the CPU.

Per backend, two servers on one tiny float32 Llama, started together with those of one other
backend (two waves of four servers: more at once overload a 2-core, 24 GiB host), with the same
--max-running-requests cap (speculation sets 48 otherwise): "plain" and "ngram"
(--speculative-algorithm NGRAM, SGLang's defaults: a breadth-10 tree of 12 draft tokens). Every
verify step is SGLang's TARGET_VERIFY, mapped by the adapter to the SPI's VERIFY step, and
SGLang's CPU speculative kernels come from sglang-fx's sgl_kernel stand-in.

- Greedy outputs of the NGRAM server equal the plain server's for the same requests sent
  concurrently. Where a token differs (batching changes floating-point reduction order), the
  plain run's top-2 logprobs must show a near-tie at the first difference (gap below 1e-3);
  near-ties are counted and printed, any other difference fails.
- On prompts that copy text (a list repeated), NGRAM accepts drafts: the mean of SGLang's
  `spec_accept_length` (tokens per verify step, bonus token included) exceeds 1.
Budget: about 7 minutes on a 2-core machine (start-ups most of it).
"""

from __future__ import annotations

import os
import random
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("sglang")
requests = pytest.importorskip("requests")

from sglang_fx.tiny import CORPUS  # noqa: E402

from .sglang_support import Server, available, stop_all, verdict  # noqa: E402

WAVES = (("reference_torch", "numpy"), ("mindspore", "jax"))  # backends whose servers run at the same time
BACKENDS = tuple(b for wave in WAVES for b in wave)
STARTUP_TIMEOUT = 420  # s: four servers start at once on two cores
REQUEST_TIMEOUT = 300  # s, per request
CAP = ("--max-running-requests", "8")
# SGLang's default n-gram corpus (10M nodes) takes about 2 GB of host memory, which SGLang's CPU
# memory check then counts against the KV pool: servers starting beside others can fail it.
NGRAM_CORPUS = ("--speculative-ngram-capacity", "200000")
WORDS = sorted(set(re.findall(r"[A-Za-z]+", CORPUS)))


def _copy_prompt(rng: random.Random) -> str:
    """A list, repeated twice and started a third time: the continuation copies it."""
    items = ", ".join(rng.sample(WORDS, rng.randint(5, 9)))
    return f"List: {items}. Again: {items}. Again: {items.split(',')[0]},"


_rng = random.Random(0)
COPY_PROMPTS = [_copy_prompt(_rng) for _ in range(4)]
OTHER_PROMPTS = [" ".join(_rng.choices(WORDS, k=_rng.randint(3, 30))) for _ in range(2)]
PROMPTS = COPY_PROMPTS + OTHER_PROMPTS
MAX_NEW_TOKENS = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from sglang_fx.tiny import make_tiny_model

    return str(make_tiny_model("llama", tmp_path_factory.mktemp("sglang_spec") / "llama"))


class Waves:
    """The servers of one wave at a time: `servers(backend)` starts the wave holding `backend`
    (after stopping the previous one) and returns {(backend, "plain" | "ngram"): Server}."""

    def __init__(self, model: str, root):
        self.model, self.root, self.wave, self.started = model, root, None, {}

    def servers(self, backend: str) -> dict:
        wave = next(w for w in WAVES if backend in w)
        if wave != self.wave:
            self.stop()
            missing = [b for b in wave if not available(b)]
            if missing:
                pytest.fail(f"backends not available: {missing} (make setup installs them)")
            self.wave = wave
            for b in wave:
                base = ("--model-impl", b, "--context-length", "512", *CAP)
                self.started[b, "plain"] = Server(f"{b}-plain", self.model, base, dict(os.environ), self.root)
                spec = (*base, "--speculative-algorithm", "NGRAM", *NGRAM_CORPUS)
                self.started[b, "ngram"] = Server(f"{b}-ngram", self.model, spec, dict(os.environ), self.root)
        return self.started

    def stop(self) -> None:
        stop_all(list(self.started.values()))
        self.started, self.wave = {}, None


@pytest.fixture(scope="module")
def waves(model, tmp_path_factory):
    w = Waves(model, tmp_path_factory.mktemp("sglang_spec_servers"))
    try:
        yield w
    finally:
        w.stop()


def _run_all(server: Server, **extra) -> list[dict]:
    server.wait_ready(STARTUP_TIMEOUT)

    def one(text: str) -> dict:
        params = {"temperature": 0, "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True}
        r = requests.post(server.url + "/generate", json={"text": text, "sampling_params": params, **extra},
                          timeout=REQUEST_TIMEOUT)  # fmt: skip
        assert r.status_code == 200, f"{server.name}: {r.status_code} {r.text[:500]}\n{server.output()}"
        return r.json()

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: batched verify steps
        return list(pool.map(one, PROMPTS))


@pytest.mark.parametrize("backend", BACKENDS)  # in wave order: each wave starts once
def test_ngram_greedy_equals_plain_and_accepts_drafts(waves, backend):
    servers = waves.servers(backend)
    plain = _run_all(servers[backend, "plain"], return_logprob=True, top_logprobs_num=2)
    spec = _run_all(servers[backend, "ngram"])
    verdicts = [verdict(s["output_ids"], p) for s, p in zip(spec, plain)]
    bad = [(PROMPTS[k], v) for k, v in enumerate(verdicts) if v not in ("same", "near-tie")]
    assert not bad, f"{backend}: NGRAM outputs differ from plain greedy beyond near-ties: {bad}"
    verify_steps = [s["meta_info"].get("spec_verify_ct", 0) for s in spec]
    assert all(n > 0 for n in verify_steps), f"{backend}: some requests ran no verify step: {verify_steps}"
    accept = [s["meta_info"]["spec_accept_length"] for s in spec]
    copy_mean = sum(accept[: len(COPY_PROMPTS)]) / len(COPY_PROMPTS)
    print(f"\n{backend}: NGRAM vs plain, {len(PROMPTS)} concurrent requests x {MAX_NEW_TOKENS} tokens: "
          f"{verdicts.count('same')} same, {verdicts.count('near-tie')} near-ties; spec_accept_length per request "
          f"{[round(a, 2) for a in accept]} (copy prompts first, mean {copy_mean:.2f}); verify steps {verify_steps}")  # fmt: skip
    assert copy_mean > 1.0, f"{backend}: NGRAM accepted no draft on prompts that copy text: {accept}"


# --------------------------------------------------------------------------------------------
# Without servers: the adapter's TARGET_VERIFY mapping and the start-up decision
# --------------------------------------------------------------------------------------------


def _verify_batch(full_mask: bool):
    """A fake TARGET_VERIFY ForwardBatch: 2 requests with 3 and 5 committed tokens, 3 draft
    tokens each (request 0 a chain, request 1 a root with two children)."""
    import types

    import torch

    from sglang.srt.model_executor.forward_batch_info import ForwardMode as SglMode

    trees = [[[1, 0, 0], [1, 1, 0], [1, 1, 1]], [[1, 0, 0], [1, 1, 0], [1, 0, 1]]]
    committed = [3, 5]
    if full_mask:  # other devices' layout: [D, committed + D] per request, committed part all ones
        mask = torch.cat([torch.cat([torch.ones(3, n), torch.tensor(t, dtype=torch.float32)], 1).flatten()
                          for n, t in zip(committed, trees)])  # fmt: skip
    else:
        mask = torch.tensor(trees).flatten()
    spec = types.SimpleNamespace(draft_token_num=3, custom_mask=mask.bool())
    return types.SimpleNamespace(forward_mode=SglMode.TARGET_VERIFY, spec_info=spec, seq_lens=torch.tensor(committed),
                                 seq_lens_cpu=torch.tensor(committed), out_cache_loc=torch.arange(100, 106),
                                 req_pool_indices=torch.tensor([1, 0]))  # fmt: skip


@pytest.mark.parametrize("full_mask", [False, True])
def test_target_verify_becomes_an_spi_verify_step(full_mask):
    import torch

    from sglang_fx.metadata import ForwardMode
    from sglang_fx.sglang.model import to_metadata

    table = torch.arange(40, dtype=torch.int32).view(2, 20)
    positions = torch.tensor([3, 4, 5, 5, 6, 6])
    meta = to_metadata(_verify_batch(full_mask), positions, table, page_size=1)
    assert meta.mode is ForwardMode.VERIFY
    assert (meta.prefix_lens_cpu, meta.extend_lens_cpu, meta.seq_lens_cpu) == ((3, 5), (3, 3), (6, 8))
    assert meta.seq_lens.tolist() == [6, 8] and meta.prefix_lens.tolist() == [3, 5]
    assert meta.positions.tolist() == positions.tolist() and meta.out_cache_loc.tolist() == list(range(100, 106))
    assert meta.logits_indices.tolist() == list(range(6))
    assert torch.equal(meta.req_to_token, table[[1, 0], :8])
    assert meta.visible(1).tolist() == [[True] * 5 + [True, False, False], [True] * 5 + [True, True, False],
                                        [True] * 5 + [True, False, True]]  # fmt: skip
    assert meta.visible(0)[:, 3:].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_startup_decision_for_speculative_decoding():
    import types

    from sglang_fx.capabilities import Capabilities
    from sglang_fx.sglang.compat import feature_problems

    def caps(verify):
        return Capabilities(dtypes={"cpu": frozenset({"float32"})}, architectures=frozenset(), verify=frozenset(verify))

    def args(algorithm, breadth=None):
        return types.SimpleNamespace(speculative_algorithm=algorithm, speculative_ngram_max_bfs_breadth=breadth)

    assert feature_problems(args("NGRAM"), caps({"tree"})) == []
    assert feature_problems(args("NGRAM", 1), caps({"chain"})) == []  # breadth 1: a chain
    (tree_on_chain,) = feature_problems(args("NGRAM"), caps({"chain"}))
    assert "needs tree verification" in tree_on_chain and "verifies chain masks only" in tree_on_chain
    (none,) = feature_problems(args("NGRAM", 1), caps(()))
    assert "needs chain verification" in none and "this backend verifies nothing" in none
    (eagle,) = feature_problems(args("EAGLE3"), caps({"tree"}))
    assert "--speculative-algorithm EAGLE3 is not supported" in eagle and "supported: NGRAM" in eagle


def test_a_quantized_draft_model_is_refused_at_startup(tmp_path):
    import types

    from sglang_fx.quantize import quantize
    from sglang_fx.sglang.compat import feature_problems
    from sglang_fx.tiny import make_tiny_model

    float_draft = make_tiny_model("llama", tmp_path / "draft")
    int8_draft = quantize(float_draft, tmp_path / "draft-w8a8")
    args = lambda draft: types.SimpleNamespace(speculative_algorithm="STANDALONE", speculative_draft_model_path=str(draft))  # noqa: E731
    assert not any("quantized" in p for p in feature_problems(args(float_draft)))
    assert any(f"the draft model {int8_draft} is quantized (compressed-tensors); a quantized draft is not supported" in p
               for p in feature_problems(args(int8_draft)))  # fmt: skip
