"""Datasets held in memory as uint8 tensors, batched augmentation and the batch loader."""
