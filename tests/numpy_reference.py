"""An independent NumPy LLaMA forward over an HF-named fp32 state dict (no hdjax model code)."""

from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, theta, inv_freq=None):
  # x: [T, heads, hd], rotate-half convention
  hd = x.shape[-1]
  if inv_freq is None:
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  ang = positions[:, None] * inv_freq[None, :]
  cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
  sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
  rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
  return x * cos + rot * sin


def numpy_logits(state, cfg, ids, inv_freq=None):
  """Logits [T, V] (float64 math) of a full causal forward."""
  s = {k: np.asarray(v, np.float64) for k, v in state.items()}
  t = len(ids)
  pos = np.arange(t, dtype=np.float64)
  x = s["model.embed_tokens.weight"][np.asarray(ids)]
  n, k, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  causal = np.tril(np.ones((t, t), bool))
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    h = _rms(x, s[p + "input_layernorm.weight"], cfg.rms_eps)
    q = _rope((h @ s[p + "self_attn.q_proj.weight"].T).reshape(t, n, hd), pos, cfg.rope_theta, inv_freq)
    kk = _rope((h @ s[p + "self_attn.k_proj.weight"].T).reshape(t, k, hd), pos, cfg.rope_theta, inv_freq)
    v = (h @ s[p + "self_attn.v_proj.weight"].T).reshape(t, k, hd)
    kk = np.repeat(kk, n // k, axis=1)
    v = np.repeat(v, n // k, axis=1)
    scores = np.einsum("tnh,snh->nts", q, kk) / np.sqrt(hd)
    scores = np.where(causal[None], scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    attn = np.einsum("nts,snh->tnh", scores, v).reshape(t, n * hd)
    x = x + attn @ s[p + "self_attn.o_proj.weight"].T
    h = _rms(x, s[p + "post_attention_layernorm.weight"], cfg.rms_eps)
    g = h @ s[p + "mlp.gate_proj.weight"].T
    u = h @ s[p + "mlp.up_proj.weight"].T
    x = x + ((g / (1 + np.exp(-g))) * u) @ s[p + "mlp.down_proj.weight"].T
  x = _rms(x, s["model.norm.weight"], cfg.rms_eps)
  head = s.get("lm_head.weight", s["model.embed_tokens.weight"])
  return x @ head.T
