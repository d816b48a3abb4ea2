"""sglang-fx backend in JAX. The plugin lives in `.plugin`."""
