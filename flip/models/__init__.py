"""Flax (linen) models: the ViT image tower, the text tower, the two-tower FLIP model and MAE."""
