"""sglang-fx backend in plain NumPy: the template for new backends. The plugin lives in `.plugin`."""
