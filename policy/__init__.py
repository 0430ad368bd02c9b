"""Policy model, loader, evaluation and statement classification."""
