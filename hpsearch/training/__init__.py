"""Training: the BP network, one trial at a time or a pack fused into one network. Torch
only, never the database."""
