"""ForwardMetadata building and the standalone Session (prefix reuse, a full pool)."""

from __future__ import annotations

import pytest
import torch

from sglang_fx.errors import KVPoolFullError, UnsupportedConfigError
from sglang_fx.generate import Session
from sglang_fx.metadata import ForwardMetadata, ForwardMode


def test_metadata_from_lists_packs_ragged_sequences():
    meta = ForwardMetadata.from_lists(token_slots=[[4, 5, 6], [9, 10]], prefix_lens=[1, 0], logits="last", page_size=1)
    assert meta.mode is ForwardMode.EXTEND and meta.num_tokens == 4 and meta.batch_size == 2
    assert meta.positions.tolist() == [1, 2, 0, 1]
    assert meta.out_cache_loc.tolist() == [5, 6, 9, 10]
    assert meta.req_to_token.tolist() == [[4, 5, 6], [9, 10, 0]]
    assert meta.logits_indices.tolist() == [1, 3]
    decode = ForwardMetadata.from_lists(token_slots=[[4, 5, 6], [9, 10]], prefix_lens=[2, 1], logits="all")
    assert decode.mode is ForwardMode.DECODE and decode.logits_indices.tolist() == [0, 1]
    with pytest.raises(ValueError, match="at least one new token"):
        ForwardMetadata.from_lists(token_slots=[[1]], prefix_lens=[1])


def test_padded_decode_repeats_the_last_sequence():
    meta = ForwardMetadata.from_lists(token_slots=[[4, 5, 6], [9, 10]], prefix_lens=[2, 1], page_size=1)
    padded, ids = meta.padded_decode(torch.tensor([11, 12]), 4)
    assert ids.tolist() == [11, 12, 12, 12]
    assert padded.batch_size == padded.num_tokens == 4
    assert padded.positions.tolist() == [2, 1, 1, 1] and padded.out_cache_loc.tolist() == [6, 10, 10, 10]
    assert padded.seq_lens.tolist() == [3, 2, 2, 2] and padded.seq_lens_cpu == (3, 2, 2, 2)
    assert padded.prefix_lens_cpu == (2, 1, 1, 1) and padded.extend_lens_cpu == (1,) * 4
    assert padded.req_to_token.tolist() == [[4, 5, 6], [9, 10, 0], [9, 10, 0], [9, 10, 0]]
    assert padded.logits_indices.tolist() == [0, 1, 1, 1]
    assert meta.padded_decode(torch.tensor([11, 12]), 2)[0].positions.tolist() == [2, 1]  # already that size
    with pytest.raises(ValueError, match="one-token-per-sequence step of at most 1 sequences"):
        meta.padded_decode(torch.tensor([11, 12]), 1)
    prefill = ForwardMetadata.from_lists(token_slots=[[4, 5, 6]], prefix_lens=[0])
    with pytest.raises(ValueError, match="one-token-per-sequence"):
        prefill.padded_decode(torch.tensor([1, 2, 3]), 4)


def test_session_reuses_cached_prefix_pages(tiny):
    s = Session("reference_torch", tiny("qwen3"), page_size=4)
    prompt = list(range(3, 14))  # 11 tokens
    first = s.generate([prompt], 3)
    seq, shared = s.new_sequence(prompt + [20])
    assert shared == 8  # two whole pages of the cached prompt
    assert s.pool.slots(seq) == s.pool.slots(0)[:8]
    s.release(seq)
    assert s.generate([prompt], 3) == first  # same tokens with the prefix served from cache


def test_session_full_pool(tiny):
    s = Session("reference_torch", tiny("qwen3"), page_size=16, max_total_tokens=64)
    s.generate([[5] * 40], 2)  # cached afterwards: 3 of 4 pages in use
    assert s.generate([[6] * 40], 2)  # needs the cache's pages: the cache is dropped, not an error
    with pytest.raises(KVPoolFullError, match="KV pool out of pages: 5 needed, 4 free of 4"):
        s.generate([[7] * 70], 2)
    assert s.pool.allocator.num_free == 4  # nothing leaked


def test_session_rejects_an_unsupported_device_before_loading(tiny):
    with pytest.raises(UnsupportedConfigError, match="device 'npu' is not supported"):
        Session("reference_torch", tiny("qwen3"), device="npu")


def test_reference_logits_within_1e5_of_transformers(tiny):
    """The issue's bar for the reference backend, tighter than the suite's 1e-4."""
    import transformers

    path = tiny("qwen3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = [5, 17, 99, 250, 3, 42, 77]
    s = Session("reference_torch", path, page_size=1)
    seq, _ = s.new_sequence(prompt)
    ours = s.forward([seq], [prompt], logits="all")
    with torch.inference_mode():
        truth = hf(torch.tensor([prompt])).logits[0]
    assert (ours - truth).abs().max().item() < 1e-5
