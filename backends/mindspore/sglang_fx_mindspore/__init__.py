"""sglang-fx MindSpore backend. The plugin lives in `.plugin`; nothing here imports MindSpore."""
