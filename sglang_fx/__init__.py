"""sglang-fx: run SGLang models through backends written in other frameworks.

The SPI: `hookspecs` (pluggy hooks a backend implements), `spi` (the Protocols its objects
satisfy), `metadata.ForwardMetadata` (one step, as data), `kv_pool` (the paged KV layout and a
standalone pool), `checkpoint` (HF config and safetensors, framework-neutral), `registry`
(discovery and selection over entry points).
"""

from .hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
