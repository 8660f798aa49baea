"""Distillation step throughput: tokens/s and MFU of the jitted train step (teacher forward + student
forward/backward + AdamW), bf16 compute with fp32 params, random weights, on all local devices.

  python bench/bench_train.py                       # GPU: default (SmolLM2-135M-shaped) and Llama-3.2-1B-shaped
  python bench/bench_train.py --models llama1b --batch 2 --seq-len 2048
  python bench/bench_train.py --tiny                # CPU smoke run (tiny shapes, fp32)

FLOPs per token: 6 N_student + 2 N_teacher (N = matmul parameters): `mfu`; `mfu_attn` adds the causal
attention scores/values FLOPs (stages.flops_per_token with the configs, PaLM's convention). Peak: --peak-tflops or the device kind's dense
bf16 figure (stages.PEAK_TFLOPS).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from hybrid_jax.config import ModelConfig
from hybrid_jax.model import hybrid
from hybrid_jax.model.init import attn_layers_for_fraction, hybrid_config, init_from_teacher
from hybrid_jax.train import config as tcfg
from hybrid_jax.train import optim, stages
from hybrid_jax.train import sharding as shd
from hybrid_jax.train import state as st

MODELS = {
    # SmolLM2-135M-Instruct (the default teacher)
    "default": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                    tie_word_embeddings=True, max_position_embeddings=8192),
    # Llama-3.2-1B
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                    rope_type="llama3", rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_position=8192, tie_word_embeddings=True, max_position_embeddings=131072),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
}


def bench_one(name: str, variant: str, batch: int, seq_len: int, steps: int, dtype: str, peak_tflops: float,
              mesh_sizes: dict, remat: str = "none", attention: str = "auto", profile_dir: str = "",
              teacher_dtype: str = "float32") -> dict:
  teacher_cfg = ModelConfig(**MODELS[name], dtype=dtype, remat=remat, attention_impl=attention)
  student_cfg = hybrid_config(teacher_cfg, attn_layers_for_fraction(teacher_cfg.num_hidden_layers, 0.5), variant)
  cfg = tcfg.from_dict({"stage": "distill", "data": {"batch_size": batch, "seq_len": seq_len},
                        "optim": {"lr": 1e-5, "warmup_steps": 1}, "loss": {"kl_weight": 1.0, "ce_weight": 0.0},
                        "mesh": mesh_sizes})
  mesh = shd.make_mesh(mesh_sizes)
  if batch % shd.batch_divisor(mesh):
    raise SystemExit(f"--batch {batch} must be a multiple of data x fsdp = {shd.batch_divisor(mesh)}")
  # Random teacher and its attention-initialised student, made op by op on the default device (a jit of the
  # whole init took minutes to compile for 30 layers) and then placed on the mesh.
  teacher = hybrid.init_params(teacher_cfg, jax.random.key(0))
  student = init_from_teacher(teacher, teacher_cfg, student_cfg, jax.random.key(1))
  # the frozen teacher may be kept in bf16 (half the memory, no per-step fp32 -> bf16 cast of its weights)
  teacher = jax.tree.map(lambda x: x.astype(teacher_dtype), teacher)
  t_sh = shd.param_shardings(teacher, teacher_cfg, mesh)
  teacher = jax.device_put(teacher, t_sh)
  student = jax.device_put(student, shd.param_shardings(student, student_cfg, mesh))
  mask = optim.trainable_mask(student, ".*")
  total = steps + 2
  tx = optim.make_optimizer(cfg.optim, total, mask)
  state, state_sh = st.create_state(student, tx, student_cfg, mesh, 0)
  del student
  step = stages.jit_train_step(
      stages.make_train_step(stages.make_loss_fn(cfg, student_cfg, teacher_cfg), tx, mask,
                             optim.lr_schedule(cfg.optim, total), 1), state_sh, t_sh, mesh)
  rng = np.random.default_rng(0)
  batch_np = {"tokens": rng.integers(0, teacher_cfg.vocab_size, (batch, seq_len)).astype(np.int32),
              "segment_ids": np.ones((batch, seq_len), np.int32),
              "loss_mask": np.ones((batch, seq_len), np.int32)}
  b = shd.shard_batch(batch_np, mesh)
  t0 = time.perf_counter()
  state, m = step(state, b, teacher)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  state, m = step(state, b, teacher)  # one more warm-up step
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, b, teacher)
  jax.block_until_ready((state.step, m))
  dt = (time.perf_counter() - t0) / steps
  if profile_dir:  # a few more steps under the profiler (perfetto JSON: per-kernel GPU time, see --profile)
    with jax.profiler.trace(os.path.join(profile_dir, f"{name}-{variant}"), create_perfetto_trace=True):
      for _ in range(3):
        state, m = step(state, b, teacher)
      jax.block_until_ready((state.step, m))
  loss = float(m["loss"])
  if not np.isfinite(loss):
    raise SystemExit(f"{name}: non-finite loss {loss}")
  n_s = stages.matmul_params(state.params, student_cfg)
  n_t = stages.matmul_params(teacher, teacher_cfg)
  tok_s = batch * seq_len / dt
  fpt = stages.flops_per_token(cfg, n_s, n_t)
  fpt_attn = stages.flops_per_token(cfg, n_s, n_t, student_cfg, teacher_cfg)
  peak = stages.peak_flops_per_device(peak_tflops)
  n_dev = mesh.devices.size
  return dict(model=name, variant=variant, remat=remat, params_student=st.count_params(state.params), params_teacher=st.count_params(teacher),
              batch=batch, seq_len=seq_len, dtype=dtype, devices=n_dev, step_ms=dt * 1e3, tokens_per_s=tok_s,
              tflops_per_dev=fpt * tok_s / n_dev / 1e12,
              mfu=(fpt * tok_s / (peak * n_dev)) if peak else float("nan"),
              mfu_attn=(fpt_attn * tok_s / (peak * n_dev)) if peak else float("nan"), compile_s=compile_s,
              loss=loss, teacher_dtype=teacher_dtype, xla_flags=os.environ.get("XLA_FLAGS", ""))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tiny", action="store_true", help="tiny shapes in fp32 (CPU check)")
  p.add_argument("--models", default="default,llama1b")
  p.add_argument("--batch", type=int, default=0, help="global batch (0: 8 for default, 4 for llama1b)")
  p.add_argument("--seq-len", type=int, default=2048)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--peak-tflops", type=float, default=0.0, help="per device; 0 = from the device kind")
  p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1")
  p.add_argument("--variants", default="mamba2,mamba", help="student Mamba variants to measure")
  p.add_argument("--remat", default="none", choices=["none", "dots", "full"])
  p.add_argument("--attention", default="auto", choices=["auto", "xla", "pallas", "cudnn"])
  p.add_argument("--teacher-dtype", default="float32", help="storage dtype of the frozen teacher's params")
  p.add_argument("--json", default="", help="also write the rows here")
  p.add_argument("--profile", default="", help="trace 3 extra steps into this dir (bench/profile_summary.py reads it)")
  a = p.parse_args(argv)
  mesh_sizes = {k: int(v) for k, v in (kv.split("=") for kv in a.mesh.split(","))}
  if a.tiny:
    names, seq, steps, dtype = ["tiny"], min(a.seq_len, 64), min(a.steps, 3), "float32"
  else:
    names, seq, steps, dtype = a.models.split(","), a.seq_len, a.steps, a.dtype
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
  rows = []
  for n in names:
    for variant in a.variants.split(","):
      bs = a.batch or (4 if n == "llama1b" else 8)
      try:
        r = bench_one(n, variant, bs, seq, steps, dtype, a.peak_tflops, mesh_sizes, a.remat, a.attention,
                      a.profile, a.teacher_dtype)
      except Exception as e:  # noqa: BLE001 -- one failing shape (e.g. out of memory) must not lose the rest
        print(f"  {n}/{variant}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
        continue
      print(f"  {n}/{variant}: {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.3f}, compile {r['compile_s']:.1f}s",
            flush=True)
      rows.append(r)
  cols = [("model", "{}"), ("variant", "{}"), ("remat", "{}"), ("params_student", "{:,}"), ("params_teacher", "{:,}"), ("batch", "{}"),
          ("seq_len", "{}"), ("dtype", "{}"), ("devices", "{}"), ("step_ms", "{:.1f}"),
          ("tokens_per_s", "{:,.0f}"), ("tflops_per_dev", "{:.1f}"), ("mfu", "{:.3f}"), ("mfu_attn", "{:.3f}"),
          ("teacher_dtype", "{}"), ("loss", "{:.3f}")]
  table = [[c for c, _ in cols]] + [[f.format(r[c]) for c, f in cols] for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=2)
  print("\ndistill train step (teacher fwd + student fwd/bwd + AdamW), random weights")
  for i, row in enumerate(table):
    print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |")
    if i == 0:
      print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return 0


if __name__ == "__main__":
  sys.exit(main())
