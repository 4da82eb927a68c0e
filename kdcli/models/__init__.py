"""Model builders. Configs point at a builder function by `_target_`; there is no registry.

`cifar.py` holds the CIFAR families of KD papers, `mlp.py` and `small.py` tiny nets for smoke runs,
`vision.py` any torchvision classifier by name, with its stem adapted to small images.
"""
