"""cogserve's front: CLI, conversation mapping, (later) HTTP API, engine loop and scheduler."""
