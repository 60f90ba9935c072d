"""CogVLM in PyTorch: config, weights, prompt building, vision tower, language model, runner."""
