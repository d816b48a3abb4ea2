"""sglang-fx reference backend in plain PyTorch. The plugin lives in `.plugin`."""
