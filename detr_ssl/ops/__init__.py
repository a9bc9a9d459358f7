"""Custom operators: multi-scale deformable attention with PyTorch, C++ CPU and CUDA back ends."""
from .ms_deform_attn import BACKENDS, available_backends, ms_deform_attn, ms_deform_attn_pytorch, set_default_backend

__all__ = ["BACKENDS", "available_backends", "ms_deform_attn", "ms_deform_attn_pytorch", "set_default_backend"]
