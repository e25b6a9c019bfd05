"""Attention without a mask: softmax(q·kᵀ·scale)·v.

q is B×H×S×D, k and v are B×H×T×D (the layout of ``F.scaled_dot_product_attention``).
"""
import torch.nn.functional as F

from ._backend import use_triton


def attention_reference(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention: q, k, v must be B×H×S×D, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError("attention: shapes do not agree: q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("attention: q, k, v must share one dtype and device")


def attention(q, k, v, scale=None):
    """Scaled dot-product attention, B×H×S×D → B×H×S×D."""
    _check(q, k, v)
    return attention_reference(q, k, v, scale)
