"""EAGLE3's model side (SPI 1.4): the capture convention, the draft checkpoint and its refusals,
and forward_hidden's argument checks. Correctness against transformers' output_hidden_states and
against an independent float64 draft runs in the conformance suite (eagle3/capture/*,
eagle3/draft/*) on every backend declaring Capabilities.eagle3 (tests/test_conformance.py)."""

from __future__ import annotations

import json

import pytest
import torch

from sglang_fx.checkpoint import EAGLE3_ARCH, load_spec
from sglang_fx.eagle3 import capture_layers, check_capture, hot_token_ids
from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.generate import Session
from sglang_fx.tiny import make_tiny_eagle3


@pytest.fixture(scope="module")
def pair(tiny, tmp_path_factory):
    """(target path, draft path): the tiny Llama with 4 layers and its draft on layers 0-2's outputs."""
    target = tiny("llama", num_hidden_layers=4)
    return target, make_tiny_eagle3(target, tmp_path_factory.mktemp("eagle3") / "draft", aux_layer_ids=(0, 1, 2))


def test_capture_layers_follow_sglang():
    """SGLang's set_eagle3_layers_to_capture: layer j's output is the input of layer j + 1;
    without ids, layers (2, L // 2, L - 3)."""
    assert capture_layers(32, (1, 15, 29)) == (2, 16, 30)
    assert capture_layers(30) == (2, 15, 27)
    assert capture_layers(32, (29, 1, 15)) == (2, 16, 30)  # SGLang's layer loop captures in layer order
    for bad in [(3, 1), (1, 1), (0, 4), (-1,)]:
        with pytest.raises(ValueError, match="strictly increasing layer indices in \\[0, 4\\)"):
            check_capture(bad, 4)
    with pytest.raises(ValueError, match="in \\[0, 2\\)"):
        capture_layers(2)  # SGLang's default needs more layers than that


def test_draft_checkpoint_reads_as_an_eagle3_spec_with_its_vocabulary(pair):
    target, draft = pair
    spec = load_spec(draft)
    assert spec.architecture == EAGLE3_ARCH and spec.num_layers == 1
    e = spec.eagle3
    assert (e.draft_vocab_size, e.num_aux, e.target_hidden_size, e.aux_layer_ids) == (256, 3, 64, (0, 1, 2))
    from safetensors.torch import load_file

    w = load_file(draft / "model.safetensors")
    hot = hot_token_ids(w["d2t"])
    assert torch.equal(hot, w["t2d"].nonzero().flatten())  # d2t maps each draft id to its target id
    assert "embed_tokens.weight" not in w


def test_draft_shares_the_target_embedding_as_sglang_does(pair, tmp_path):
    """SGLang's EAGLE3 worker gives the draft the target's embedding (set_embed), replacing one the
    draft carries; and the target's head too when config.json names no draft_vocab_size."""
    target_path, draft_path = pair
    target = Session("reference_torch", target_path, dtype="float32")
    draft = Session("reference_torch", draft_path, dtype="float32", target=target)
    assert draft.weights["embed_tokens.weight"] is target.weights["model.embed_tokens.weight"]
    assert draft.weights["lm_head.weight"].shape == (256, 64)  # its own head over its draft vocabulary
    own = make_tiny_eagle3(target_path, tmp_path / "own", own_embedding=True)
    assert Session("reference_torch", own, dtype="float32", target=target).weights["embed_tokens.weight"] is \
        target.weights["model.embed_tokens.weight"]  # fmt: skip
    full = make_tiny_eagle3(target_path, tmp_path / "full", draft_vocab_size=512)
    cfg = json.loads((full / "config.json").read_text())
    del cfg["draft_vocab_size"]
    (full / "config.json").write_text(json.dumps(cfg))
    assert Session("reference_torch", full, dtype="float32", target=target).weights["lm_head.weight"] is target.weights["lm_head.weight"]
    with pytest.raises(ValueError, match="give its target's Session"):
        Session("reference_torch", draft_path, dtype="float32")


def test_forward_hidden_refuses_mismatched_roles_and_shapes(pair):
    target_path, draft_path = pair
    target = Session("reference_torch", target_path, dtype="float32")
    draft = Session("reference_torch", draft_path, dtype="float32", target=target)
    t = target.new_sequence([5, 6, 7])[0]
    with pytest.raises(ValueError, match="only an EAGLE3 draft takes hidden states"):
        target.forward_hidden([t], [[5, 6, 7]], hidden=torch.zeros(3, 64))
    logits, none = target.forward_hidden([t], [[5, 6, 7]])  # no capture: logits only
    assert none is None and logits.shape == (1, 512)
    d = draft.new_sequence([6, 7, 8])[0]
    with pytest.raises(ValueError, match=r"needs the target's hidden states; call forward_hidden"):
        draft.forward([d], [[6, 7, 8]])
    with pytest.raises(ValueError, match=r"needs hidden \[3, 192\] .* or \[3, 64\] .*, got \[3, 100\]"):
        draft.forward_hidden([d], [[6, 7, 8]], hidden=torch.zeros(3, 100))
    with pytest.raises(ValueError, match="only a target model captures"):
        draft.forward_hidden([d], [[6, 7, 8]], capture=(0,), hidden=torch.zeros(3, 64))


@pytest.mark.parametrize("change,why", [({"num_hidden_layers": 2}, "num_hidden_layers 2"), ({"fc_norm": True}, "fc_norm set"),
                                        ({"tie_word_embeddings": True}, "tie_word_embeddings set")])  # fmt: skip
def test_unsupported_draft_layouts_are_refused_naming_the_field(pair, tmp_path, change, why):
    import shutil

    bad = shutil.copytree(pair[1], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text()) | change
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match=f"draft has {why}; sglang-fx runs EAGLE3 drafts of one decoder layer"):
        load_spec(bad)


#: A backend written for SPI 1.3: the reference backend's hooks with 1.3's Capabilities (no eagle3, no draft).
SPI_1_3 = """
from dataclasses import replace
from sglang_fx import hookimpl
from sglang_fx.checkpoint import ARCHITECTURES
import sglang_fx_reference_torch.plugin as ref

@hookimpl
def sglang_fx_backend_info():
    info = ref.sglang_fx_backend_info()
    caps = replace(info.capabilities, eagle3=False, architectures=frozenset(ARCHITECTURES))
    return replace(info, name="old", spi_version="1.3", capabilities=caps)

sglang_fx_make_exchange = ref.sglang_fx_make_exchange
sglang_fx_make_kv_cache = ref.sglang_fx_make_kv_cache
sglang_fx_make_attention = ref.sglang_fx_make_attention
sglang_fx_make_runner = ref.sglang_fx_make_runner
"""


def test_a_1_3_backend_loads_and_is_refused_only_eagle3(pair, fake_registry):
    old = fake_registry({"dist-old": {"old": SPI_1_3}}).load("old")
    (problem,) = old.capabilities.validate(eagle3=True)
    assert "Capabilities.eagle3" in problem and "serve without EAGLE3" in problem
    assert old.capabilities.validate(eagle3=False) == [] and "eagle3 [none]" in old.capabilities.describe()
    target = Session(old, pair[0], dtype="float32")  # it still runs its targets
    assert target.generate([[5, 6, 7]], 2)
    with pytest.raises(UnsupportedConfigError, match=f"architecture '{EAGLE3_ARCH}' is not supported"):
        Session(old, pair[1], dtype="float32", target=target)


@pytest.mark.parametrize("backend,options", [("mindspore", {"mode": "jit"}), ("mindspore", {"mode": "pynative"}),
                                             ("jax", {}), ("jax", {"extend": "whole"}), ("numpy", {})])  # fmt: skip
def test_compiled_backends_match_the_reference_on_odd_batches(pair, backend, options):
    """Three sequences: the decode steps run padded to the decode graph of 4 (jit), the draft's
    hidden rows with them; the target's capture (in extend and decode programs) and the draft's
    logits and hidden_out equal reference_torch's (itself checked against transformers and a
    float64 draft by conformance)."""
    pytest.importorskip(backend)
    prompts = [[5, 17, 99, 250, 3], [260, 14], [7, 8, 9, 10, 11, 12, 13]]
    out = {}
    for backend, options in [("reference_torch", {}), (backend, options)]:
        target = Session(backend, pair[0], dtype="float32", options=options)
        draft = Session(backend, pair[1], dtype="float32", options=options, target=target)
        capture = capture_layers(4, draft.spec.eagle3.aux_layer_ids)
        seqs = [target.new_sequence(p)[0] for p in prompts]
        logits, cap = target.forward_hidden(seqs, prompts, capture=capture)
        _, cap2 = target.forward_hidden(seqs, [[1], [2], [3]], capture=capture)  # a decode step of 3
        dseqs = [draft.new_sequence(p)[0] for p in prompts]
        d_logits, h = draft.forward_hidden(dseqs, prompts, logits="all", hidden=cap)
        last = torch.tensor([4, 6, 13])
        d2_logits, h2 = draft.forward_hidden(dseqs, [[1], [2], [3]], hidden=h[last])  # its own [3, H]
        d3_logits, h3 = draft.forward_hidden(dseqs, [[4], [5], [6]], hidden=cap2)  # a capture, in a decode step
        out[backend] = [logits, cap, cap2, d_logits, h, d2_logits, h2, d3_logits, h3]
    for ref, ours in zip(out["reference_torch"], out[backend]):
        assert ref.shape == ours.shape and ours.dtype == torch.float32
        assert (ref - ours).abs().max().item() < 1e-4
