"""torch <-> JAX by DLPack, zero-copy both ways on CPU under the copy rules of `spi.Exchange`.

JAX 0.7.1 imports a DLPack buffer without a copy only when it is 64-byte aligned; otherwise XLA
copies it and only logs a line, and `copy=False` is not passed down. So `from_torch` compares
the pointers itself: an unaligned buffer under copy=False is a BufferError, as the contract says,
instead of a silent copy that would also hide later writes to the torch tensor.
"""

from __future__ import annotations

import jax
import torch

from sglang_fx.exchange import export_torch, finish_import

ALIGNMENT = 64  # bytes XLA needs to alias a DLPack buffer


class JaxExchange:
    def from_torch(self, t: torch.Tensor, *, copy: bool | None = None) -> jax.Array:
        src = export_torch(t, copy)
        if src.numel() and src.data_ptr() % ALIGNMENT:
            if copy is False:
                raise BufferError(
                    f"tensor of shape {list(t.shape)} at address {src.data_ptr():#x} is not {ALIGNMENT}-byte aligned, so JAX "
                    "cannot alias it (XLA copies unaligned buffers); allocate it aligned (torch's own allocations are) or pass copy=None"
                )
            src = src.clone()  # torch's allocations are aligned; XLA would copy too, and log it
        x = jax.dlpack.from_dlpack(src)
        if src.numel() and x.unsafe_buffer_pointer() != src.data_ptr():
            raise BufferError(f"JAX copied a {ALIGNMENT}-byte aligned tensor of shape {list(t.shape)} on import; "
                              "the exchange cannot keep its aliasing contract with this jaxlib")  # fmt: skip
        return x

    def to_torch(self, x: jax.Array, *, copy: bool | None = None) -> torch.Tensor:
        return finish_import(torch.from_dlpack(x), copy)
