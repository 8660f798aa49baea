"""Independent PyTorch references of the MambaInLlama mixers, written from docs/DESIGN.md §3.1-3.2 as plain loops.

Parameter names and shapes follow the reference modules (so `load_state_dict(strict=True)` checks the
converter's key names); the maths is a sequential per-step loop in float64, deliberately unlike the JAX code
(explicit index maps instead of reshapes/repeats, F.conv1d with padding instead of a carried state).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _conv(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
  """x [b, l, C] -> causal depthwise conv (left zero pad) + bias, [b, l, C]."""
  l = x.shape[1]
  return conv(x.transpose(1, 2))[..., :l].transpose(1, 2)


class TorchMamba1(nn.Module):
  def __init__(self, d_model, d_inner, d_xb, d_state, dt_rank, d_conv=4, double_dt_bias=True):
    super().__init__()
    self.d_inner, self.d_xb, self.N, self.twice = d_inner, d_xb, d_state, double_dt_bias
    self.in_proj_x = nn.Linear(d_model, d_xb, bias=False)
    self.in_proj_z = nn.Linear(d_model, d_inner, bias=False)
    self.B_proj = nn.Linear(d_model, d_xb, bias=False)
    self.C_proj = nn.Linear(d_model, d_inner, bias=False)
    self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
    self.dt_proj_down = nn.Linear(d_model, dt_rank, bias=False)
    self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
    self.A_log = nn.Parameter(torch.zeros(d_inner, d_state))
    self.D = nn.Parameter(torch.ones(d_inner))
    self.out_proj = nn.Linear(d_inner, d_model, bias=False)

  def forward(self, u):
    b, l, _ = u.shape
    N, di, rep = self.N, self.d_inner, self.d_inner // self.d_xb
    x0, z, B0, C = self.in_proj_x(u), self.in_proj_z(u), self.B_proj(u), self.C_proj(u)
    dt = self.dt_proj(self.dt_proj_down(u))  # includes dt_proj.bias
    # repeat_kv on groups of N: repeated group j <- original group j // rep
    src = torch.tensor([((c // N) // rep) * N + c % N for c in range(di)])
    x = F.silu(_conv(x0[..., src], self.conv1d))
    A = -torch.exp(self.A_log)
    bias = self.dt_proj.bias if self.twice else 0.0
    h = torch.zeros(b, di, N, dtype=u.dtype)
    ys = []
    for t in range(l):
      y_t = torch.zeros(b, di, dtype=u.dtype)
      for c in range(di):
        g = c // N  # C group of channel c; the B group is the repeated one, original group g // rep
        Bt = B0[:, t, (g // rep) * N:(g // rep + 1) * N]
        Ct = C[:, t, g * N:(g + 1) * N]
        delta = F.softplus(dt[:, t, c] + bias[c] if self.twice else dt[:, t, c])
        h[:, c] = torch.exp(delta[:, None] * A[c]) * h[:, c] + (delta * x[:, t, c])[:, None] * Bt
        y_t[:, c] = (h[:, c] * Ct).sum(-1) + self.D[c] * x[:, t, c]
      ys.append(y_t * F.silu(z[:, t]))
    return self.out_proj(torch.stack(ys, 1))


class _Weight(nn.Module):
  def __init__(self, n):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(n))


class TorchMamba2(nn.Module):
  def __init__(self, d_model, d_inner, d_xb, ngroups, d_state, d_conv=4):
    super().__init__()
    self.d_inner, self.d_xb, self.H, self.N = d_inner, d_xb, ngroups, d_state
    self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * d_xb + ngroups, bias=False)
    cd = 2 * d_xb + d_inner
    self.conv1d = nn.Conv1d(cd, cd, d_conv, groups=cd, padding=d_conv - 1)
    self.dt_bias = nn.Parameter(torch.zeros(ngroups))
    self.A_log = nn.Parameter(torch.zeros(ngroups))
    self.D = nn.Parameter(torch.ones(ngroups))
    self.norm = _Weight(d_inner)
    self.out_proj = nn.Linear(d_inner, d_model, bias=False)

  def forward(self, u):
    b, l, _ = u.shape
    di, dxb, H, N = self.d_inner, self.d_xb, self.H, self.N
    rep = di // dxb
    zxbcdt = self.in_proj(u)
    z = zxbcdt[..., :di]
    xbc = F.silu(_conv(zxbcdt[..., di:di + 2 * dxb + di], self.conv1d))
    dt = zxbcdt[..., di + 2 * dxb + di:]
    x, B, C = xbc[..., :dxb], xbc[..., dxb:2 * dxb], xbc[..., 2 * dxb:]
    A = -torch.exp(self.A_log)
    h = torch.zeros(b, H, N, N, dtype=u.dtype)  # [b, H, P, N], P = N
    ys = []
    for t in range(l):
      y_t = torch.zeros(b, di, dtype=u.dtype)
      for hh in range(H):
        kv = hh // rep  # GQA: head hh reads kv group hh // rep of x and B
        xt = x[:, t, kv * N:(kv + 1) * N]
        Bt = B[:, t, kv * N:(kv + 1) * N]
        Ct = C[:, t, hh * N:(hh + 1) * N]
        delta = F.softplus(dt[:, t, hh] + self.dt_bias[hh])
        a = torch.exp(delta * A[hh])
        h[:, hh] = a[:, None, None] * h[:, hh] + (delta[:, None] * xt)[:, :, None] * Bt[:, None, :]
        y_t[:, hh * N:(hh + 1) * N] = (h[:, hh] * Ct[:, None, :]).sum(-1) + self.D[hh] * xt
      # gated RMSNorm, norm_before_gate=False, groups of N channels, eps 1e-5
      g = (y_t * F.silu(z[:, t])).view(b, H, N)
      g = g / torch.sqrt((g * g).mean(-1, keepdim=True) + 1e-5)
      ys.append(g.reshape(b, di) * self.norm.weight)
    return self.out_proj(torch.stack(ys, 1))


def torch_hybrid(cfg, attn_layers, variant):
  """A transformers LlamaForCausalLM whose non-attention layers are MambaInLlama-style decoder layers
  (`.mamba`, `.mlp`, `.input_layernorm`, `.post_attention_layernorm`), float64."""
  from transformers import LlamaConfig, LlamaForCausalLM
  from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

  hf = LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")})
  model = LlamaForCausalLM(hf)

  class Layer(nn.Module):
    def __init__(self):
      super().__init__()
      if variant == "mamba":
        self.mamba = TorchMamba1(cfg.hidden_size, cfg.d_inner, cfg.d_xb, cfg.ssm.d_state, cfg.dt_rank,
                                 cfg.ssm.d_conv)
      else:
        self.mamba = TorchMamba2(cfg.hidden_size, cfg.d_inner, cfg.d_xb,
                                 cfg.ssm.ngroups or cfg.num_attention_heads, cfg.ssm.d_state, cfg.ssm.d_conv)
      self.mlp = LlamaMLP(hf)
      self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
      self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, hidden_states, *args, **kwargs):
      h = hidden_states + self.mamba(self.input_layernorm(hidden_states))
      return h + self.mlp(self.post_attention_layernorm(h))

  for i in range(cfg.num_hidden_layers):
    if i not in attn_layers:
      model.model.layers[i] = Layer()
  return model.double().eval()


def softplus_inv(x: float) -> float:
  return x + math.log(-math.expm1(-x))
