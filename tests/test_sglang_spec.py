"""Speculative decoding through the SPI: SGLang's NGRAM (drafts from each request's own
n-grams, verified as a tree) with --model-impl reference_torch, numpy, mindspore and jax on the CPU,
and STANDALONE (a draft model) with a mindspore or jax target and a reference_torch or numpy draft.

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

STANDALONE (a third wave: one server per target/draft pair, plus a server whose draft route is
bad): the draft is a copy of the target (same checkpoint), chosen by SGLANG_FX_OPTIONS' "draft"
entry, drafting chains of 3 (topk 1, 4 draft tokens with the bonus one). SGLang 0.5.23 runs
STANDALONE through its EAGLE worker, whose draft sees the sequence shifted by one (draft position
p holds token p + 1, the prompt's first token is never fed to the draft), so even a self-draft
misses some tokens. The test therefore checks the exact outcome: greedy outputs equal the plain
server's (near-ties counted), and each request's verify steps and accepted drafts equal an
independent transformers simulation of that algorithm on the same weights, except where the
simulated draft's top-2 gap is a near-tie (counted). --disable-radix-cache: with prefix hits, the
draft's KV at the cached boundary holds the earlier request's next token (SGLang keys its radix
cache by bigrams for EAGLE but not for STANDALONE), which lowers acceptance unpredictably.

EAGLE3 (in the same wave: a mindspore target with a numpy draft, a jax target with a mindspore
draft): a random-weight LlamaForCausalLMEagle3 draft of the same tiny target
(`make_tiny_eagle3`), reading the embeddings and layer 0's output (aux layer ids -1 and 0: SGLang
captures the inputs of layers 0 and 1), chains of 3, radix cache on (EAGLE keys it by bigrams).
A random draft accepts almost nothing over a full vocabulary, so its vocabulary is the target's 4
most frequent greedy tokens on PROMPTS: it then accepts some drafts, and which ones depends on the
hidden states it is fed. Greedy outputs equal the plain server's (near-ties counted), and each
request's (verify steps, accepted drafts) equal an independent simulation of SGLang's EAGLE3 chain
(target: transformers' logits and output_hidden_states; draft: the conformance suite's plain
float64 torch draft), which a capture of the same layers in the other order would not match.
Budget: about 8.5 minutes on a 2-core machine (start-ups most of it; 6.5 without the EAGLE3 servers).
"""

from __future__ import annotations

import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("sglang")
requests = pytest.importorskip("requests")

from sglang_fx.tiny import CORPUS, make_tiny_eagle3  # noqa: E402

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
STANDALONE_PAIRS = (("mindspore", "reference_torch"), ("jax", "numpy"))  # (target backend, draft backend)
DRAFT_STEPS = 3
STANDALONE = ("--speculative-algorithm", "STANDALONE", "--speculative-num-steps", str(DRAFT_STEPS),
              "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", str(DRAFT_STEPS + 1),
              "--disable-radix-cache")  # fmt: skip
EAGLE3_PAIRS = (("mindspore", "numpy"), ("jax", "mindspore"))  # (target backend, draft backend)
EAGLE3_AUX = (-1, 0)  # the target layers whose outputs the draft reads (-1: the embeddings)
EAGLE3_HOT = 4  # the draft vocabulary: the target's most frequent greedy tokens on PROMPTS
EAGLE3_SEED = 2  # the draft's weights (make_tiny_eagle3); its choices are never near-ties on PROMPTS
EAGLE3 = ("--speculative-algorithm", "EAGLE3", "--speculative-num-steps", str(DRAFT_STEPS), "--speculative-eagle-topk", "1",
          "--speculative-num-draft-tokens", str(DRAFT_STEPS + 1))  # fmt: skip


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


@pytest.fixture(scope="module")
def hf(model):
    """(transformers model, tokenizer) of the tiny target, float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(model)


@pytest.fixture(scope="module")
def eagle3_draft(model, hf, tmp_path_factory) -> str:
    """The tiny EAGLE3 draft of `model`: random weights, its vocabulary the EAGLE3_HOT target tokens
    that transformers' greedy continuations of PROMPTS use most."""
    import collections

    import torch

    hf_model, tokenizer = hf
    counts = collections.Counter()
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            for _ in range(MAX_NEW_TOKENS):
                ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
                counts[ids[-1]] += 1
    hot = [t for t, _ in counts.most_common(EAGLE3_HOT)]
    out = tmp_path_factory.mktemp("sglang_spec_eagle3") / "draft"
    return str(make_tiny_eagle3(model, out, seed=EAGLE3_SEED, aux_layer_ids=EAGLE3_AUX, hot_ids=hot))


def _draft_route(backend: str) -> dict:
    return {**os.environ, "SGLANG_FX_OPTIONS": json.dumps({"draft": {"backend": backend}})}


class Waves:
    """The servers of one wave at a time: `servers(backend)` starts the wave holding `backend`
    (after stopping the previous one) and returns {(backend, "plain" | "ngram"): Server};
    `standalone()` starts the STANDALONE and EAGLE3 wave, {(target, "standalone" | "eagle3"):
    Server, "bad route": Server}, plus plain servers for targets whose plain outputs no earlier wave recorded in
    `plain` (backend -> the plain server's answers to PROMPTS, with top-2 logprobs)."""

    def __init__(self, model: str, root, eagle3_draft: str):
        self.model, self.root, self.wave, self.started, self.plain = model, root, None, {}, {}
        self.eagle3_draft = eagle3_draft

    def _base(self, backend: str) -> tuple:
        return ("--model-impl", backend, "--context-length", "512", *CAP)

    def servers(self, backend: str) -> dict:
        wave = next(w for w in WAVES if backend in w)
        if wave != self.wave:
            self.stop()
            missing = [b for b in wave if not available(b)]
            if missing:
                pytest.fail(f"backends not available: {missing} (make setup installs them)")
            self.wave = wave
            for b in wave:
                base = self._base(b)
                self.started[b, "plain"] = Server(f"{b}-plain", self.model, base, dict(os.environ), self.root)
                spec = (*base, "--speculative-algorithm", "NGRAM", *NGRAM_CORPUS)
                self.started[b, "ngram"] = Server(f"{b}-ngram", self.model, spec, dict(os.environ), self.root)
        return self.started

    def standalone(self) -> dict:
        if self.wave != "standalone":
            self.stop()
            missing = [b for pair in STANDALONE_PAIRS + EAGLE3_PAIRS for b in pair if not available(b)]
            if missing:
                pytest.fail(f"backends not available: {missing} (make setup installs them)")
            self.wave = "standalone"
            for target, draft in STANDALONE_PAIRS:
                args = (*self._base(target), *STANDALONE, "--speculative-draft-model-path", self.model)
                self.started[target, "standalone"] = Server(f"{target}-standalone-{draft}", self.model, args,
                                                            _draft_route(draft), self.root)  # fmt: skip
            for target, draft in EAGLE3_PAIRS:
                args = (*self._base(target), *EAGLE3, "--speculative-draft-model-path", self.eagle3_draft)
                self.started[target, "eagle3"] = Server(f"{target}-eagle3-{draft}", self.model, args, _draft_route(draft),
                                                        self.root)  # fmt: skip
            for target in sorted({t for t, _ in STANDALONE_PAIRS + EAGLE3_PAIRS} - set(self.plain)):
                self.started[target, "plain"] = Server(f"{target}-plain", self.model, self._base(target),
                                                       dict(os.environ), self.root)  # fmt: skip
            bad = (*self._base("numpy"), *STANDALONE, "--speculative-draft-model-path", self.model)
            self.started["bad route"] = Server("standalone-bad-route", self.model, bad, _draft_route("no_such_backend"), self.root)
        return self.started

    def plain_answers(self, backend: str) -> list[dict]:
        if backend not in self.plain:
            self.plain[backend] = _run_all(self.started[backend, "plain"], return_logprob=True, top_logprobs_num=2)
        return self.plain[backend]

    def stop(self) -> None:
        stop_all([s for s in self.started.values()])
        self.started, self.wave = {}, None


@pytest.fixture(scope="module")
def waves(model, eagle3_draft, tmp_path_factory):
    w = Waves(model, tmp_path_factory.mktemp("sglang_spec_servers"), eagle3_draft)
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
    plain = waves.plain_answers(backend)
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


def _simulate_standalone(model, prompt: list[int]) -> tuple[int, int, float]:
    """SGLang 0.5.23's STANDALONE at topk 1 with the target as its own draft, greedy, in plain
    transformers: after the prefill's first token, each verify step drafts DRAFT_STEPS greedy
    tokens from the committed sequence without its first token (the EAGLE worker's shifted
    draft), accepts the longest prefix the target's argmax agrees with, plus the target's next
    token, until MAX_NEW_TOKENS. Returns (verify steps, accepted drafts, the smallest top-2
    logit gap among the draft's choices)."""
    import torch

    def step(ids: list[int]) -> tuple[int, float]:
        top = model(torch.tensor([ids])).logits[0, -1].float().topk(2)
        return int(top.indices[0]), float(top.values[0] - top.values[1])

    with torch.no_grad():
        seq = prompt + [step(prompt)[0]]
        made, steps, accepted, gap = 1, 0, 0, float("inf")
        while made < MAX_NEW_TOKENS:
            draft = []
            for _ in range(DRAFT_STEPS):
                token, g = step(seq[1:] + draft)
                draft.append(token)
                gap = min(gap, g)
            target = model(torch.tensor([seq + draft])).logits[0, len(seq) - 1 :].argmax(-1).tolist()
            k = 0
            while k < DRAFT_STEPS and draft[k] == target[k]:
                k += 1
            seq += draft[:k] + [target[k]]
            made, steps, accepted = made + k + 1, steps + 1, accepted + k
    return steps, accepted, gap


@pytest.mark.parametrize("target,draft", STANDALONE_PAIRS)
def test_standalone_self_draft_on_another_backend(waves, model, target, draft):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    servers = waves.standalone()
    plain = waves.plain_answers(target)
    spec = _run_all(servers[target, "standalone"])
    log = servers[target, "standalone"].output(200_000)
    assert f"on backend {draft!r}" in log and "_Draft_ForCausalLM" in log, f"the draft did not run on {draft}:\n{log[-3000:]}"
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    simulated = [_simulate_standalone(hf, tokenizer(prompt)["input_ids"]) for prompt in PROMPTS]
    got, summary = _matches_simulation(f"{target} + {draft} draft", "STANDALONE", spec, plain, simulated)
    print(f"\n{target} target + {draft} draft (self-draft, chains of {DRAFT_STEPS}), {summary}")
    assert all(n > 0 for n, _ in got), f"{target}: some requests ran no verify step: {got}"


def _matches_simulation(run: str, algorithm: str, spec: list[dict], plain: list[dict],
                        simulated: list[tuple[int, int, float]]) -> tuple[list[tuple[int, int]], str]:  # fmt: skip
    """A speculative run's answers (`spec`, one per PROMPTS) against plain greedy's and against
    the simulation of SGLang's `algorithm` on the same weights ((verify steps, accepted drafts,
    smallest draft top-2 gap) per prompt): every output equals plain greedy up to near-ties, and
    each request's (verify steps, accepted drafts) equals the simulation's unless the draft or
    the output met a near-tie. Returns the run's (verify steps, accepted drafts) and a summary."""
    verdicts = [verdict(s["output_ids"], p) for s, p in zip(spec, plain)]
    bad = [(PROMPTS[k], v) for k, v in enumerate(verdicts) if v not in ("same", "near-tie")]
    assert not bad, f"{run}: {algorithm} outputs differ from plain greedy beyond near-ties: {bad}"
    got = [(s["meta_info"]["spec_verify_ct"], s["meta_info"]["spec_num_correct_drafts"]) for s in spec]
    draft_ties = 0
    for k, (steps, accepted, gap) in enumerate(simulated):
        if got[k] != (steps, accepted) or verdicts[k] != "same":
            assert gap < 1e-3 or verdicts[k] == "near-tie", (
                f"{run}, prompt {k}: (verify steps, accepted drafts) {got[k]}, the simulation of SGLang's {algorithm} "
                f"on the same weights {(steps, accepted)}, and no near-tie (smallest draft top-2 gap {gap:.2e})")
            draft_ties += 1
    accept = [round(s["meta_info"]["spec_accept_length"], 2) for s in spec]
    proposed = sum(s["meta_info"]["spec_num_proposed_drafts"] for s in spec)
    summary = (f"{len(PROMPTS)} concurrent requests x {MAX_NEW_TOKENS} tokens: {verdicts.count('same')} same as plain, "
               f"{verdicts.count('near-tie')} near-ties; (verify steps, accepted drafts) {got}, simulation "
               f"{[(n, a) for n, a, _ in simulated]}, {draft_ties} near-ties; accepted {sum(a for _, a in got)}/{proposed} "
               f"drafts; spec_accept_length {accept}")  # fmt: skip
    return got, summary


def _simulate_eagle3(hf_model, draft: str, prompt: list[int], capture: tuple[int, ...]) -> tuple[int, int, float]:
    """SGLang 0.5.23's EAGLE3 at topk 1, greedy, with the target in transformers and the draft in
    the conformance suite's plain float64 torch (`draft_reference`, written from SGLang's
    models/llama_eagle3.py); `capture`: the target layers whose inputs (output_hidden_states) the
    draft reads, concatenated in that order. The EAGLE v2 worker keeps the draft one token ahead:
    draft position p holds committed token p + 1 with the target's captured hidden state at p (its
    prefill extend, and after each verification the accepted window's extend); a draft decode step
    feeds the draft's own hidden output of the row before. Per verify step: the draft extends over
    the committed sequence (its last row picks the first draft token), DRAFT_STEPS - 1 decode
    steps pick the rest (draft ids mapped to target ids by d2t), the target verifies the chain and
    the longest agreeing prefix is accepted plus the target's next token, until MAX_NEW_TOKENS.
    Recomputing each pass densely equals SGLang's cached one: causal attention, and every cached
    draft row it reads is an accepted one. Returns (verify steps, accepted drafts, the smallest
    top-2 logit gap among the draft's choices)."""
    import torch
    from safetensors.torch import load_file

    from sglang_fx.checkpoint import load_spec
    from sglang_fx.conformance.eagle3 import draft_fc, draft_reference

    spec = load_spec(draft)
    w = load_file(f"{draft}/model.safetensors")
    w["embed_tokens.weight"] = hf_model.get_input_embeddings().weight.detach()  # shared with the target, as SGLang does
    hot = torch.arange(len(w["d2t"])) + w["d2t"]

    def target(seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        out = hf_model(torch.tensor([seq]), output_hidden_states=True)
        return out.logits[0], torch.cat([out.hidden_states[i][0] for i in capture], -1)

    with torch.no_grad():
        seq = prompt + [int(target(prompt)[0][-1].argmax())]
        made, steps, accepted, gap = 1, 0, 0, float("inf")
        while made < MAX_NEW_TOKENS:
            ids, h = seq[1:], draft_fc(w, target(seq)[1][:-1])  # draft rows 0 .. len(seq) - 2
            drafts = []
            for _ in range(DRAFT_STEPS):
                logits, out = draft_reference(spec, w, ids, h)
                top = logits[-1].topk(2)
                drafts.append(int(hot[top.indices[0]]))
                gap = min(gap, float(top.values[0] - top.values[1]))
                ids, h = ids + drafts[-1:], torch.cat([h, out[-1:]])
            verified = target(seq + drafts)[0][len(seq) - 1 :].argmax(-1).tolist()
            k = 0
            while k < DRAFT_STEPS and drafts[k] == verified[k]:
                k += 1
            seq += drafts[:k] + [verified[k]]
            made, steps, accepted = made + k + 1, steps + 1, accepted + k
    return steps, accepted, gap


@pytest.fixture(scope="module")
def eagle3_simulated(hf, eagle3_draft) -> list[tuple[int, int, float]]:
    """_simulate_eagle3 of each of PROMPTS with the layers SGLang captures for the draft (j + 1)."""
    hf_model, tokenizer = hf
    capture = tuple(j + 1 for j in EAGLE3_AUX)
    return [_simulate_eagle3(hf_model, eagle3_draft, tokenizer(p)["input_ids"], capture) for p in PROMPTS]


def test_eagle3_simulation_depends_on_the_captured_layers(hf, eagle3_draft, eagle3_simulated):
    """The acceptance check below can fail: the draft accepts some drafts, and fed the same layers'
    capture in the other order, it would accept others."""
    hf_model, tokenizer = hf
    right = [(s, a) for s, a, _ in eagle3_simulated]
    swapped = tuple(j + 1 for j in reversed(EAGLE3_AUX))
    wrong = [_simulate_eagle3(hf_model, eagle3_draft, tokenizer(p)["input_ids"], swapped)[:2] for p in PROMPTS]
    print(f"\nEAGLE3 simulation, (verify steps, accepted drafts) per request: {right}; with the capture's layers swapped: {wrong}")
    assert sum(a for _, a in right) > 0, f"the draft accepts nothing: {right}"
    assert wrong != right, f"the simulated acceptance does not depend on the capture: {right}"


@pytest.mark.parametrize("target,draft", EAGLE3_PAIRS)
def test_eagle3_with_a_draft_on_another_backend(waves, eagle3_draft, eagle3_simulated, target, draft):
    servers = waves.standalone()
    plain = waves.plain_answers(target)
    spec = _run_all(servers[target, "eagle3"])
    log = servers[target, "eagle3"].output(200_000)
    assert f"LlamaForCausalLMEagle3 from {eagle3_draft} on backend {draft!r}" in log, f"the draft did not run on {draft}:\n{log[-3000:]}"
    capture = [j + 1 for j in EAGLE3_AUX]
    assert f"EAGLE3 target captures the inputs of layers {capture}" in log, log[-3000:]
    got, summary = _matches_simulation(f"{target} + {draft} EAGLE3 draft", "EAGLE3", spec, plain, eagle3_simulated)
    print(f"\n{target} target + {draft} EAGLE3 draft (random weights, {EAGLE3_HOT}-token vocabulary, chains of {DRAFT_STEPS}), {summary}")
    assert sum(a for _, a in got) > 0, f"{target} + {draft}: the EAGLE3 draft accepted nothing: {got}"


def test_a_bad_draft_route_is_refused_at_startup(waves):
    server = waves.standalone()["bad route"]
    code = server.wait_exit(STARTUP_TIMEOUT)
    log = server.output(20_000)
    assert code not in (None, 0), f"a server with the draft route 'no_such_backend' started:\n{log[-3000:]}"
    assert "the draft model's backend 'no_such_backend'" in log and "is not an installed sglang-fx backend; accepted:" in log \
        and "numpy" in log.split("accepted:")[-1][:300], log[-3000:]  # fmt: skip


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
    (eagle,) = feature_problems(args("EAGLE"), caps({"tree"}))
    assert "--speculative-algorithm EAGLE is not supported" in eagle and "supported: NGRAM, STANDALONE, EAGLE3" in eagle


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


def _draft_batch(mode: str):
    """A fake draft-model ForwardBatch: 2 requests with 3 and 5 committed tokens (fb.seq_lens),
    request rows 1 and 0. DECODE: draft step 1 (positions committed + 1); DRAFT_EXTEND_V2: the
    4-token verify window after the committed tokens."""
    import types

    import torch

    from sglang.srt.model_executor.forward_batch_info import ForwardMode as SglMode

    committed = torch.tensor([3, 5])
    fb = types.SimpleNamespace(forward_mode=getattr(SglMode, mode), seq_lens=committed, seq_lens_cpu=committed,
                               req_pool_indices=torch.tensor([1, 0]))  # fmt: skip
    if mode == "DECODE":
        fb.out_cache_loc = torch.tensor([40, 50])
    else:  # SGLang's prepare_for_draft_extend: seq_lens already count the window
        fb.seq_lens = fb.seq_lens_cpu = committed + 4
        fb.extend_seq_lens, fb.extend_prefix_lens = torch.tensor([4, 4]), committed
        fb.extend_seq_lens_cpu, fb.extend_prefix_lens_cpu = [4, 4], [3, 5]
        fb.out_cache_loc = torch.arange(60, 68)
    return fb


def test_draft_steps_become_ordinary_spi_steps():
    import torch

    from sglang_fx.metadata import ForwardMode
    from sglang_fx.sglang.model import to_metadata

    table = torch.arange(40, dtype=torch.int32).view(2, 20)
    # Draft decode step 1: each token at committed + 1, seeing the committed tokens, the step-0
    # draft token and itself; fb.seq_lens still the committed lengths.
    meta = to_metadata(_draft_batch("DECODE"), torch.tensor([4, 6]), table, page_size=1, draft=True)
    assert meta.mode is ForwardMode.DECODE
    assert (meta.seq_lens_cpu, meta.prefix_lens_cpu, meta.extend_lens_cpu) == ((5, 7), (4, 6), (1, 1))
    assert meta.seq_lens.tolist() == [5, 7] and torch.equal(meta.req_to_token, table[[1, 0], :7])
    assert meta.logits_indices.tolist() == [0, 1]
    # The same batch in the target's runner is a plain decode step of the committed lengths.
    plain = to_metadata(_draft_batch("DECODE"), torch.tensor([2, 4]), table, page_size=1)
    assert plain.seq_lens_cpu == (3, 5)
    # DRAFT_EXTEND_V2: an EXTEND of the window, logits for all 8 tokens (SGLang picks per request).
    positions = torch.tensor([3, 4, 5, 6, 5, 6, 7, 8])
    meta = to_metadata(_draft_batch("DRAFT_EXTEND_V2"), positions, table, page_size=1, draft=True)
    assert meta.mode is ForwardMode.EXTEND
    assert (meta.seq_lens_cpu, meta.prefix_lens_cpu, meta.extend_lens_cpu) == ((7, 9), (3, 5), (4, 4))
    assert meta.logits_indices.tolist() == list(range(8)) and meta.out_cache_loc.tolist() == list(range(60, 68))


def test_startup_decision_for_standalone_and_its_draft_route(monkeypatch, tmp_path):
    import types

    from sglang_fx.errors import UnsupportedConfigError
    from sglang_fx.sglang import compat, draft_backend, plugin
    from sglang_fx.tiny import make_tiny_model

    def args(topk):
        return types.SimpleNamespace(speculative_algorithm="STANDALONE", speculative_eagle_topk=topk)

    assert compat.feature_problems(args(1)) == []
    (tree,) = compat.feature_problems(args(4))
    assert "STANDALONE with --speculative-eagle-topk 4 is not supported" in tree and "use --speculative-eagle-topk 1" in tree

    monkeypatch.delenv("SGLANG_FX_OPTIONS", raising=False)
    assert draft_backend("jax") == "jax"  # default: the target's backend
    monkeypatch.setenv("SGLANG_FX_OPTIONS", '{"draft": {"backend": "numpy"}, "jax": {"x": "1"}}')
    assert draft_backend("jax") == "numpy"
    monkeypatch.setenv("SGLANG_FX_OPTIONS", '{"draft": {"backnd": "numpy"}}')
    with pytest.raises(UnsupportedConfigError, match=r"'draft' entry takes only \"backend\".*not \['backnd'\]"):
        draft_backend("jax")

    draft_dir = make_tiny_model("llama", tmp_path / "draft")
    view = types.SimpleNamespace(speculative_draft_model_path=str(draft_dir), page_size=1)
    monkeypatch.setattr(plugin, "_backends", ["jax", "numpy"])
    monkeypatch.setenv("SGLANG_FX_OPTIONS", '{"draft": {"backend": "tensorflow"}}')
    (unknown,) = plugin.draft_problems("jax", view, "float32", "cpu")
    assert "the draft model's backend 'tensorflow'" in unknown and "accepted: jax, numpy (default: the target's, 'jax')" in unknown
    monkeypatch.setenv("SGLANG_FX_OPTIONS", '{"draft": {"backend": "numpy"}}')
    assert plugin.draft_problems("jax", view, "float32", "cpu") == []
    (dtype,) = plugin.draft_problems("jax", view, "float64", "cpu")
    assert dtype.startswith("the draft model on backend 'numpy': dtype 'float64' is not supported")


def test_startup_decision_for_eagle3(monkeypatch, tmp_path, model):
    import dataclasses
    import types

    from sglang_fx.capabilities import Capabilities
    from sglang_fx.checkpoint import load_spec
    from sglang_fx.sglang import compat, plugin
    from sglang_fx.tiny import make_tiny_model

    caps = Capabilities(dtypes={"cpu": frozenset({"float32"})}, architectures=frozenset({"LlamaForCausalLM"}),
                        verify=frozenset({"chain"}))  # fmt: skip
    with_eagle3 = dataclasses.replace(caps, eagle3=True, architectures=caps.architectures | {"LlamaForCausalLMEagle3"})

    def args(topk=1, tp=1):
        return types.SimpleNamespace(speculative_algorithm="EAGLE3", speculative_eagle_topk=topk, tp_size=tp)

    assert compat.feature_problems(args(), with_eagle3) == []
    (tree,) = compat.feature_problems(args(topk=4), with_eagle3)
    assert "EAGLE3 with --speculative-eagle-topk 4 is not supported" in tree and "use --speculative-eagle-topk 1" in tree
    (no_capture,) = compat.feature_problems(args(), caps)  # a backend written for SPI 1.3
    assert "EAGLE3 speculative decoding needs hidden-state capture" in no_capture and "Capabilities.eagle3" in no_capture
    (tp,) = compat.feature_problems(args(tp=2), with_eagle3)
    assert "EAGLE3 with --tp-size 2 is not supported" in tp and "use --tp-size 1" in tp

    # The draft: an EAGLE3 checkpoint made for this target, on a backend declaring eagle3.
    draft = make_tiny_eagle3(model, tmp_path / "draft")
    registry = types.SimpleNamespace(available_info=lambda name, isolated: types.SimpleNamespace(
        capabilities=with_eagle3 if name == "numpy" else caps))  # fmt: skip
    monkeypatch.setattr(plugin, "default_registry", lambda: registry)
    monkeypatch.setattr(plugin, "_backends", ["jax", "numpy"])
    monkeypatch.setenv("SGLANG_FX_OPTIONS", '{"draft": {"backend": "numpy"}}')
    target = load_spec(model)

    def problems(algorithm, path, target_spec=target):
        view = types.SimpleNamespace(speculative_algorithm=algorithm, speculative_draft_model_path=str(path), page_size=1)
        return plugin.draft_problems("jax", view, "float32", "cpu", target_spec=target_spec)

    assert problems("EAGLE3", draft) == []
    (plain_draft,) = problems("EAGLE3", model)
    assert "--speculative-algorithm EAGLE3 needs an EAGLE3 draft (architecture LlamaForCausalLMEagle3)" in plain_draft
    (standalone,) = problems("STANDALONE", draft)
    assert "is an EAGLE3 draft" in standalone and "use --speculative-algorithm EAGLE3, not STANDALONE" in standalone
    other = load_spec(make_tiny_model("llama", tmp_path / "other", hidden_size=32))
    (hidden,) = problems("EAGLE3", draft, other)
    assert "reads hidden states 64 wide (target_hidden_size) and the target's are 32" in hidden
    monkeypatch.setenv("SGLANG_FX_OPTIONS", '{"draft": {"backend": "jax"}}')  # a backend without eagle3
    arch, capture = problems("EAGLE3", draft)
    assert arch.startswith("the draft model on backend 'jax': architecture 'LlamaForCausalLMEagle3' is not supported")
    assert "EAGLE3 speculative decoding needs hidden-state capture" in capture

    # An EAGLE3 draft given as the model to serve.
    draft_config = types.SimpleNamespace(hf_config=types.SimpleNamespace(architectures=["LlamaForCausalLMEagle3"]),
                                         dtype="torch.float32")  # fmt: skip
    monkeypatch.setattr(compat, "server_model_config", lambda server_args: draft_config)
    args = types.SimpleNamespace(model_impl="numpy", device="cpu", page_size=1, tp_size=1, ep_size=1, disable_cuda_graph=True,
                                 model_path=str(draft))  # fmt: skip
    with pytest.raises(ValueError, match=r"is an EAGLE3 draft \(LlamaForCausalLMEagle3\), not a model to serve: give it as "
                                         r"--speculative-draft-model-path"):  # fmt: skip
        plugin.check_backend("numpy", args)
