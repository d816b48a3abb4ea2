"""Shape buckets for backends that compile a graph per shape (MindSpore's jit, JAX's XLA): the
sizes a step is padded to, and the backend options that choose them, parsed once here.

A step padded to a bucket reuses that bucket's compiled graph, as SGLang's CUDA graphs do for
batch sizes. Decode steps pad their batch with `ForwardMetadata.padded_decode` to the least of
the decode batch sizes that holds it; other sizes (tokens, context length) round up to a power
of two (`power_of_two`), so a few dozen graphs cover every step up to the context limit.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import UnsupportedConfigError
from .metadata import ForwardMetadata

#: Default decode batch sizes: powers of two to 8, then steps of at most half the size.
DECODE_BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def power_of_two(n: int, minimum: int = 1) -> int:
    """The least power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def fit(n: int, sizes: tuple[int, ...]) -> int | None:
    """The least of `sizes` (sorted) that holds n, or None when none does."""
    return next((s for s in sizes if s >= n), None)


def decode_batches(text: str | None, backend: str) -> tuple[int, ...]:
    """The `decode_batches` option as sorted sizes: None -> DECODE_BATCHES, "none" -> ()."""
    if text is None:
        return DECODE_BATCHES
    if text.strip().lower() == "none":
        return ()
    try:
        sizes = sorted({int(b) for b in text.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise UnsupportedConfigError(
            f"{backend} backend: decode_batches {text!r} is not a comma-separated list of positive batch sizes (e.g. '1,2,4,8') or 'none'"
        )
    return tuple(sizes)


def precompile_batches(text: str | None, batches: tuple[int, ...], backend: str) -> tuple[int, ...] | None:
    """The `precompile` option: None (compile on first use), else the decode batch sizes to
    compile ahead ("all": every one of `batches`; "1,2,4": those, each one of `batches`)."""
    if text is None or text.strip().lower() == "none":
        return None
    if text.strip().lower() == "all":
        return batches
    try:
        sizes = tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        sizes = ()
    if not sizes or any(b not in batches for b in sizes):
        raise UnsupportedConfigError(f"{backend} backend: precompile {text!r} is not none, all, or a comma-separated list "
                                     f"of decode batch sizes among {','.join(map(str, batches)) or '(none: decode_batches is none)'}")  # fmt: skip
    return sizes


def warmup_steps(page_size: int, decode_batches: Sequence[int], prefills: Sequence[tuple[str, int]] = (("prefill", 2),),
                 device: str = "cpu") -> list[tuple[str, ForwardMetadata]]:  # fmt: skip
    """Dummy steps that make a compiling backend build its graphs before the first real step
    (`precompile`): one prefill of n tokens (no cached prefix) per (label, n) in `prefills`, then
    one decode step of each of `decode_batches` sequences ("decode batch B": one new token after
    one cached), as (label, metadata). Every token's slot is in page 0, so run them only on a
    pool that holds no sequence yet (a backend's first forward): the real step then writes its
    own slots."""
    slots = lambda n: [j % page_size for j in range(n)]  # noqa: E731  (n tokens in page 0, positions 0..n-1)
    steps = [(label, [slots(n)], [0]) for label, n in prefills]
    steps += [(f"decode batch {b}", [slots(2)] * b, [1] * b) for b in decode_batches]
    return [(label, ForwardMetadata.from_lists(token_slots=t, prefix_lens=p, page_size=page_size, device=device))
            for label, t, p in steps]  # fmt: skip
