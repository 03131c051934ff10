"""Layers: activations and the 1-Lipschitz layer families."""
