"""Independent numpy (float64) oracles and input makers for the pallas_kernels tests.

The oracles follow the definitions in ../shared/specs/algorithms.md §3-4 literally: dequantize every landmark
with a dense Hadamard matrix built from the popcount formula, then dot / softmax in float64. They share no code
with pallas_kernels.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np


def hadamard_popcount(n: int) -> np.ndarray:
    """``H[i, j] = (-1)**popcount(i & j)`` (Sylvester order), float64."""
    i = np.arange(n)
    bits = np.vectorize(lambda x: bin(x).count("1"))(i[:, None] & i[None, :])
    return np.where(bits % 2 == 0, 1.0, -1.0)


def dequantize(codes, scales, grid) -> np.ndarray:
    """Landmarks ``(1/D) H_D (s * concat_j grid[code_j])``, float64 ``[B, Hkv, T, D]``."""
    codes = np.asarray(codes).astype(np.int64)
    grid = np.asarray(grid, np.float64)
    B, Hkv, T, J = codes.shape
    d = grid.shape[1]
    D = J * d
    y = grid[codes].reshape(B, Hkv, T, D) * np.asarray(scales, np.float64)[..., None]
    return y @ hadamard_popcount(D) / D


def score_oracle(q, codes, scales, grid, lengths, mode: str) -> np.ndarray:
    """YAKV landmark scores: eval -> bf16-valued float64 array, serve -> float64; -inf where invalid."""
    lm = dequantize(codes, scales, grid)                      # [B, Hkv, T, D]
    B, Hkv, T, D = lm.shape
    qf = np.asarray(jnp.asarray(q, jnp.float32), np.float64)  # the exact values the kernels see
    G = qf.shape[1] // Hkv
    lengths = np.clip(np.asarray(lengths), 0, T)
    out = np.full((B, Hkv, T), -np.inf)
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        for h in range(Hkv):
            qs = qf[b, h * G:(h + 1) * G]                      # [G, D]
            if mode == "serve":
                out[b, h, :n] = lm[b, h, :n] @ qs.mean(axis=0)
            else:
                logits = qs @ lm[b, h, :n].T / np.sqrt(D)      # [G, n]
                e = np.exp(logits - logits.max(axis=1, keepdims=True))
                p = (e / e.sum(axis=1, keepdims=True)).astype(ml_dtypes.bfloat16).astype(np.float64)
                out[b, h, :n] = p.max(axis=0)
    return out


def attention_oracle(q, k, v, lengths=None, mask=None, scale=None) -> np.ndarray:
    """One-query GQA attention in float64 with q rounded to K's dtype; zeros where nothing is valid."""
    qf = np.asarray(jnp.asarray(q).astype(jnp.asarray(k).dtype).astype(jnp.float32), np.float64)
    kf = np.asarray(jnp.asarray(k, jnp.float32), np.float64)
    vf = np.asarray(jnp.asarray(v, jnp.float32), np.float64)
    B, H, D = qf.shape
    Hkv, S = kf.shape[1], kf.shape[2]
    G = H // Hkv
    scale = 1 / np.sqrt(D) if scale is None else scale
    valid = np.ones((B, Hkv, S), bool)
    if lengths is not None:
        L = np.clip(np.asarray(lengths), 0, S)
        L = np.broadcast_to(L[:, None] if L.ndim == 1 else L, (B, Hkv))
        valid &= np.arange(S)[None, None, :] < L[:, :, None]
    bias = np.zeros((B, Hkv, S))
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask), (B, Hkv, S))
        if m.dtype == bool:
            valid &= m
        else:
            bias = m.astype(np.float64)
    out = np.zeros((B, H, D))
    for b in range(B):
        for h in range(H):
            kv = h // G
            s = kf[b, kv] @ qf[b, h] * scale + bias[b, kv]
            ok = valid[b, kv] & np.isfinite(s)
            if not ok.any():
                continue
            w = np.exp(s[ok] - s[ok].max())
            out[b, h] = (w / w.sum()) @ vf[b, kv][ok]
    return out


def make_score_inputs(rng, B, Hkv, G, D, d, T, *, qdtype=jnp.float32, n=256, lengths=None):
    """Random scoring inputs (codes < n, scales in [0.5, 3), grid ~ N(0, 1))."""
    J = D // d
    codes = jnp.asarray(rng.integers(0, n, (B, Hkv, T, J)).astype(np.uint8))
    scales = jnp.asarray(rng.uniform(0.5, 3.0, (B, Hkv, T)).astype(np.float32))
    grid = jnp.asarray(rng.standard_normal((n, d)).astype(np.float32))
    q = jnp.asarray(rng.standard_normal((B, Hkv * G, D)) * 2.0, qdtype)
    if lengths is None:
        lengths = rng.integers(1, T + 1, (B,))
    return q, codes, scales, grid, jnp.asarray(np.asarray(lengths), jnp.int32)
