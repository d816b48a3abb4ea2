"""The standalone paged KV pool and its page allocator."""

from __future__ import annotations

import pytest
import torch

from sglang_fx.errors import KVPoolFullError
from sglang_fx.kv_pool import KVLayout, PageAllocator, PagedKVPool


def pool(page_size: int, num_pages: int) -> PagedKVPool:
    return PagedKVPool(KVLayout(1, num_pages, page_size, (2, 4), (2, 4), torch.float32))


@pytest.mark.parametrize("page_size", [1, 16, 128])
def test_slots_are_page_aligned_and_grow_within_pages(page_size):
    p = pool(page_size, num_pages=8)
    first = p.reserve("a", page_size + 3)
    more = p.reserve("a", 2)
    slots = p.slots("a")
    assert slots == first + more and len(slots) == page_size + 5
    assert all(s % page_size == j % page_size for j, s in enumerate(slots))
    pages = {s // page_size for s in slots}
    assert len(pages) == -(-(page_size + 5) // page_size)


def test_full_pool_raises_and_changes_nothing():
    p = pool(16, num_pages=3)
    p.reserve("a", 20)  # 2 pages
    p.k_buffers[0][p.slots("a")] = 1.0
    snapshot = p.k_buffers[0].clone()
    with pytest.raises(KVPoolFullError, match=r"KV pool out of pages: 2 needed, 1 free of 3.*more pages"):
        p.reserve_many({"a": 12, "b": 17})  # a fits its 2 pages, b needs 2
    assert p.length("a") == 20 and "b" not in p and p.allocator.num_free == 1
    assert torch.equal(p.k_buffers[0], snapshot)
    p.reserve("a", 13)  # what still fits does: a takes the last page
    assert p.allocator.num_free == 0


def test_fork_shares_whole_pages_and_refcounts_them():
    p = pool(4, num_pages=6)
    p.reserve("a", 10)  # pages for tokens 0-3, 4-7, 8-9
    assert p.fork("b", "a", 9) == 8  # two whole pages
    assert p.slots("b") == p.slots("a")[:8]
    p.reserve("b", 3)
    assert p.slots("b")[8:] != p.slots("a")[8:10]
    free = p.allocator.num_free
    p.release("a")  # b still holds the shared pages
    assert p.allocator.num_free == free + 1
    p.release("b")
    assert p.allocator.num_free == 6


def test_allocator_rejects_double_free():
    a = PageAllocator(2)
    pages = a.alloc(1)
    a.free(pages)
    with pytest.raises(ValueError, match="freed twice"):
        a.free(pages)
