"""A tiny randomly initialised CLIP checkpoint, written to disk for tests and the demo.

No model hub is needed: the checkpoint is built from a ``CLIPConfig`` and saved with
``save_pretrained`` next to a ``CLIPImageProcessor``, then loaded by path through the
same code as a real checkpoint.  Random weights still map an image and its exact or
re-encoded copy to nearly the same vector, but distinct photos land at cosine 0.9-0.99,
so use thresholds of 0.995 and above with it; quality claims need real weights.
"""

from __future__ import annotations

import os


def make_tiny_clip(path: str | os.PathLike, *, seed: int = 0, image_size: int = 64) -> str:
    """Write a small random CLIP (2 layers, hidden size 32) to ``path``; returns the path."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    try:  # transformers 5.x: the PIL processor needs no torchvision
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as processor_class

    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.save_pretrained(path)
    processor_class(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    ).save_pretrained(path)
    return os.fspath(path)
