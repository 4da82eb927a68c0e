"""Distillation losses, one file per method. Each is an nn.Module built from the `loss` config."""
