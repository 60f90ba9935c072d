"""Training the embedded default model: a tiny CogVLM on synthetic shapes (issue 7)."""
