"""Custom operators: multi-scale deformable attention with PyTorch, C++ CPU and CUDA back ends, and a
CPU dropout whose mask is cheap to draw."""
from .seeded_dropout import Dropout, dropout
from .ms_deform_attn import BACKENDS, available_backends, ms_deform_attn, ms_deform_attn_pytorch, set_default_backend

__all__ = ["BACKENDS", "Dropout", "available_backends", "dropout", "ms_deform_attn", "ms_deform_attn_pytorch",
           "set_default_backend"]
