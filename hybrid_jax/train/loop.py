"""The training loop: sharded jitted steps, progress bar, metrics, periodic eval, checkpoints, resume, signals.

`train(...)` takes already-built models and data iterators (see `hybrid_jax.train.cli` for the CLI glue), so
tests can drive it with tiny random models.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from hybrid_jax.config import ConfigError, ModelConfig
from hybrid_jax.pallas import KernelOptions
from hybrid_jax.train import checkpointing as ckpt_lib
from hybrid_jax.train import distributed, optim, stages
from hybrid_jax.train import sharding as shd
from hybrid_jax.train import state as st
from hybrid_jax.train.config import TrainConfig


@dataclasses.dataclass
class TrainResult:
  state: st.TrainState
  step: int
  interrupted: bool
  losses: dict[int, float]          # step (1-based, after the update) -> loss
  eval_start: dict[str, float]
  eval_end: dict[str, float]
  checkpoint_dir: str


class _Metrics:
  """MetricsWriter (JSONL + TensorBoard) from hybrid_jax.train.metrics when present, else JSONL only.
  Only process 0 of a multi-process run writes (the others would write the same rows)."""

  def __init__(self, logdir: str):
    self._w = self._f = None
    if not distributed.is_primary():
      return
    os.makedirs(logdir, exist_ok=True)
    try:
      from hybrid_jax.train.metrics import MetricsWriter
      self._w = MetricsWriter(logdir)
      self._f = None
    except ImportError:  # the training-support module is missing: keep a plain JSONL log
      self._w = None
      self._f = open(os.path.join(logdir, "metrics.jsonl"), "a")  # noqa: SIM115 - open for the run

  def write(self, step: int, values: dict[str, float]) -> None:
    if self._w is not None:
      self._w.write(step, values)
    elif self._f is not None:
      import json
      self._f.write(json.dumps({"step": step, **values}) + "\n")
      self._f.flush()

  def close(self) -> None:
    if self._w is not None:
      self._w.close()
    elif self._f is not None:
      self._f.close()


def _batch_keys(cfg: TrainConfig) -> tuple[str, ...]:
  return stages.DPO_KEYS if cfg.stage == "dpo" else stages.LM_KEYS


def _next_batch(it: Iterator, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  b = next(it)
  missing = [k for k in keys if k not in b]
  if missing:
    raise ConfigError(f"data batches lack {missing} (have {sorted(b)}): wrong data format for this stage?")
  return {k: np.asarray(b[k]) for k in keys}


def _fmt(m: dict[str, float]) -> str:
  return " ".join(f"{k}={v:.4g}" for k, v in m.items())


def train(cfg: TrainConfig, *, student_params, student_cfg: ModelConfig, frozen_params=None,
          frozen_cfg: ModelConfig | None = None, train_iter, eval_batches: list | None = None,
          output_dir: str, resume: bool = False, mesh=None,
          save_model_fn: Callable[[Any, str], None] | None = None,
          on_step: Callable[[int, dict], None] | None = None, log: Callable[[str], None] = print,
          progress: bool = True, kernel_options: KernelOptions | None = None) -> TrainResult:
  """Runs `cfg.train.steps` optimiser steps (continuing from the latest checkpoint with `resume`).

  frozen_params/frozen_cfg: the teacher (align/distill/sft+KL) or the DPO reference model.
  save_model_fn(params, dir): writes the final model dir (checkpoint.save_model with config + tokenizer).
  on_step(step, metrics): test hook called after each step.
  kernel_options: tuning of the SSM kernels (None: the defaults); the steps get them with this mesh (on TPU
  the kernels run per shard of it).
  """
  tc = cfg.train
  mesh = mesh or shd.make_mesh(dataclasses.asdict(cfg.mesh))
  dcfg = cfg.data_config
  if dcfg.batch_size % shd.batch_divisor(mesh):
    raise ConfigError(f"data.batch_size={dcfg.batch_size} must be a multiple of the data x fsdp mesh size "
                      f"{shd.batch_divisor(mesh)}")
  needs_frozen = cfg.stage == "dpo" or stages.uses_teacher(cfg)
  if needs_frozen and frozen_params is None:
    raise ConfigError(f"stage {cfg.stage!r} needs a {'reference' if cfg.stage == 'dpo' else 'teacher'} model")

  mask = optim.trainable_mask(student_params, optim.trainable_pattern(cfg.stage, cfg.optim, student_cfg))
  schedule = optim.lr_schedule(cfg.optim, tc.steps)
  tx = optim.make_optimizer(cfg.optim, tc.steps, mask)
  state, state_sh = st.create_state(student_params, tx, student_cfg, mesh, tc.seed)
  del student_params
  frozen, frozen_sh = None, None
  if needs_frozen:
    frozen_sh = shd.param_shardings(frozen_params, frozen_cfg, mesh)
    frozen = jax.device_put(frozen_params, frozen_sh)

  ckpt_dir = os.path.join(output_dir, "checkpoints")
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=tc.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None and not resume:
    ckpt.close()
    raise ConfigError(f"{ckpt_dir} already holds checkpoints (latest step {latest}): pass --resume to "
                      "continue it, --overwrite to start again, or another --output")
  if latest is not None:
    state, meta = ckpt.restore(st.abstract_state(state_sh, state), train_iter, latest)
    if meta.get("stage", cfg.stage) != cfg.stage:
      raise ConfigError(f"checkpoint in {ckpt_dir} is from stage {meta.get('stage')!r}, not {cfg.stage!r}")
    log(f"resumed from {ckpt_dir} at step {latest}")
  elif resume:
    log(f"--resume: no checkpoint in {ckpt_dir} yet; starting from step 0")
  start = int(jax.device_get(state.step))

  kernel_options = dataclasses.replace(kernel_options or KernelOptions(), mesh=mesh)
  loss_fn = stages.make_loss_fn(cfg, student_cfg, frozen_cfg, kernel_options)
  step_fn = stages.jit_train_step(
      stages.make_train_step(loss_fn, tx, mask, schedule, tc.grad_accum), state_sh, frozen_sh, mesh)
  teacher_for_eval = frozen if (needs_frozen and cfg.stage != "dpo") else None
  eval_fn = (stages.make_dpo_eval_step(cfg, student_cfg, kernel_options) if cfg.stage == "dpo" else
             stages.make_eval_step(student_cfg, frozen_cfg if teacher_for_eval is not None else None,
                                   cfg.loss.temperature, kernel_options))
  n_student = stages.matmul_params(state.params, student_cfg)
  n_frozen = stages.matmul_params(frozen, frozen_cfg) if needs_frozen else 0
  fpt = stages.flops_per_token(cfg, n_student, n_frozen)
  peak = stages.peak_flops_per_device(tc.peak_tflops)
  n_dev = mesh.devices.size
  keys = _batch_keys(cfg)
  meta = {"stage": cfg.stage, "config": cfg.to_dict()}

  def evaluate(tag: str) -> dict[str, float]:
    if not eval_batches:
      return {}
    if cfg.stage == "dpo":
      res = stages.run_dpo_eval(eval_fn, state.params, frozen, eval_batches, mesh)
      log(f"[eval {tag} step {int(jax.device_get(state.step))}] DPO loss {res['eval/dpo_loss']:.4f} | reward "
          f"margin {res['eval/reward_margin']:.4f} | reward accuracy {res['eval/reward_accuracy']:.3f}")
      return res
    res = stages.run_eval(eval_fn, state.params, teacher_for_eval, eval_batches, mesh)
    msg = f"[eval {tag} step {int(jax.device_get(state.step))}] student ppl {res['eval/ppl']:.3f}"
    if "eval/teacher_ppl" in res:
      msg += f" | teacher ppl {res['eval/teacher_ppl']:.3f} | KL(teacher||student) {res['eval/kl']:.4f}"
    log(msg)
    return res

  writer = _Metrics(os.path.join(output_dir, "logs"))
  log(f"stage={cfg.stage} steps={tc.steps} batch={dcfg.batch_size}x{dcfg.seq_len} devices={n_dev} "
      f"mesh={dict(mesh.shape)} student={st.count_params(state.params) / 1e6:.1f}M params "
      f"(trainable {sum(int(x.size) for x, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mask)) if m) / 1e6:.1f}M)"
      + (f" frozen={st.count_params(frozen) / 1e6:.1f}M" if needs_frozen else ""))
  eval_start = evaluate("start")
  if eval_start:
    writer.write(start, eval_start)

  losses: dict[int, float] = {}
  pending: list[tuple[int, dict]] = []
  interrupted = False
  bar = tqdm(total=tc.steps, initial=start, disable=not progress or not distributed.is_primary(),
             dynamic_ncols=True, file=sys.stdout, desc=cfg.stage)
  t_last, tok_since = time.perf_counter(), 0
  step = start
  try:
    with ckpt_lib.StopFlag() as flag:
      while step < tc.steps:
        try:
          batch = _next_batch(train_iter, keys)
        except StopIteration:
          log(f"data exhausted after step {step}; stopping early")
          break
        n_tok = dcfg.batch_size * dcfg.seq_len * (2 if cfg.stage == "dpo" else 1)  # global: all processes
        state, m = step_fn(state, shd.shard_batch(batch, mesh), frozen)
        step += 1
        tok_since += n_tok
        pending.append((step, m))
        if on_step is not None:
          on_step(step, m)
        # a signal reaches the processes at different steps: they agree on stopping at a log step
        stop = flag.stop if jax.process_count() == 1 else (
            step % tc.log_every == 0 and distributed.any_process(flag.stop))
        if step % tc.log_every == 0 or step == tc.steps or stop:
          fetched = jax.device_get(pending)
          dt = time.perf_counter() - t_last
          tps = tok_since / max(dt, 1e-9)
          for s, mm in fetched:
            losses[s] = float(mm["loss"])
          last = {k: float(v) for k, v in fetched[-1][1].items()}
          row = {k: last[k] for k in ("loss", "kl", "ce", "dpo", "reward_margin", "reward_accuracy",
                                       "grad_norm", "lr") if k in last}
          row["tokens_per_s"] = tps
          if peak:
            row["mfu"] = fpt * tps / (peak * n_dev)
          writer.write(step, row)
          bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
          pending.clear()
          t_last, tok_since = time.perf_counter(), 0
        bar.update(1)
        if tc.save_every and step % tc.save_every == 0 and step < tc.steps:
          ckpt.save(state, train_iter, meta)
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
          writer.write(step, evaluate("periodic"))
        if stop:
          interrupted = True
          log(f"\nsignal {flag.signum}: saving a checkpoint at step {step} and exiting")
          break
      ckpt.save(state, train_iter, meta)
      ckpt.wait()
  finally:
    bar.close()
  if interrupted:
    ckpt.close()
    writer.close()
    return TrainResult(state, step, True, losses, eval_start, {}, ckpt_dir)
  eval_end = evaluate("end")
  if eval_end:
    writer.write(step, eval_end)
    if eval_start and "eval/ppl" in eval_start:
      teacher = (f"teacher {eval_start['eval/teacher_ppl']:.3f} | " if "eval/teacher_ppl" in eval_start else "")
      log(f"held-out perplexity: {teacher}student {eval_start['eval/ppl']:.3f} (start) -> "
          f"{eval_end['eval/ppl']:.3f} (end)")
  writer.close()
  ckpt.close()
  if save_model_fn is not None:
    model_dir = os.path.join(output_dir, "model")
    if jax.process_count() > 1:  # multi-host: arrays are not fully addressable; gather to every host
      from jax.experimental import multihost_utils
      params = multihost_utils.process_allgather(state.params, tiled=True)
    else:
      params = jax.device_get(state.params)
    save_model_fn(params, model_dir)
    log(f"final model saved to {model_dir}")
  return TrainResult(state, step, False, losses, eval_start, eval_end, ckpt_dir)
