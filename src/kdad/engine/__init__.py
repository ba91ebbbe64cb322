"""Engine: fit, infer, checkpoint. Takes a config and a model, knows nothing of the CLI."""
