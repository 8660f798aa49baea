"""`train.py` command line: config + models + data -> loop.train.

  python train.py --stage=align|distill|sft|dpo --config configs/X.yaml [--teacher DIR] [--init DIR]
                  [--output DIR] [--resume] [key=value ...]      e.g. optim.lr=1e-4 train.steps=200

Where the student comes from:
  --init DIR    a model dir from a previous stage (checkpoint.save_model); its attention layout is kept, except
                in `align`, where a different layout in the config converts it progressively: layers that were Mamba are kept whole, newly
                replaced layers are initialised from the teacher's attention.
  otherwise     the teacher, turned into the configured hybrid by init_from_teacher (docs/DESIGN.md §3.3).
The frozen model: the teacher (align / distill / sft with KL) or, for dpo, the starting model itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

import jax

from hybrid_jax.config import ConfigError, ModelConfig
from hybrid_jax.train import config as tcfg
from hybrid_jax.train import distributed, loop, stages
from hybrid_jax.train import sharding as shd

DEFAULT_CACHE = ".cache"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--stage", choices=tcfg.STAGES, help="overrides the config's `stage`")
  p.add_argument("--config", help="YAML recipe (configs/*.yaml)")
  p.add_argument("--teacher", help="teacher model dir (convert_torch.py output)")
  p.add_argument("--init", help="start from this model dir instead of initialising from the teacher")
  p.add_argument("--output", help="run dir (checkpoints/, logs/, model/); default: the config's train.output")
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
  p.add_argument("--overwrite", action="store_true",
                 help="delete --output's earlier checkpoints and start from step 0 (instead of --resume)")
  p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where default data is generated/cached")
  p.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs only)")
  p.add_argument("--data-only", action="store_true",
                 help="generate the recipe's default data into --cache-dir (when missing), print its files, exit")
  distributed.add_args(p)
  p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")
  return p.parse_intermixed_args(argv)  # options and key=value overrides in any order


# ---- models ------------------------------------------------------------------------------------

def _load(directory: str, what: str):
  from hybrid_jax.checkpoint import load_model
  if not directory:
    raise ConfigError(f"no {what} model given")
  return load_model(directory)


def check_tokenizers(teacher: tuple[ModelConfig, Any, str], student: tuple[ModelConfig, Any, str]) -> None:
  """KL / pseudo-labels compare distributions token id by token id: both models must share a tokenizer."""
  (tc, ttok, tdir), (sc, stok, sdir) = teacher, student
  if tc.vocab_size != sc.vocab_size:
    raise ConfigError(f"tokenizer mismatch: teacher {tdir} has vocab_size {tc.vocab_size}, student {sdir} has "
                      f"{sc.vocab_size}; token ids would not line up (use a teacher with the student's tokenizer)")
  if ttok is not None and stok is not None and ttok.get_vocab() != stok.get_vocab():
    diff = sum(1 for k, v in ttok.get_vocab().items() if stok.get_vocab().get(k) != v)
    raise ConfigError(f"tokenizer mismatch: {diff} tokens of teacher {tdir} have other ids (or are missing) in "
                      f"student {sdir}'s tokenizer")


def _target_attn(cfg: tcfg.TrainConfig, n_layers: int) -> tuple[int, ...]:
  from hybrid_jax.model.init import attn_layers_for_fraction
  if cfg.model.attn_layers is not None:
    bad = [i for i in cfg.model.attn_layers if not 0 <= i < n_layers]
    if bad:
      raise ConfigError(f"model.attn_layers {bad} out of range for {n_layers} layers")
    return tuple(sorted(cfg.model.attn_layers))
  return attn_layers_for_fraction(n_layers, cfg.model.attn_fraction)


def _with_dtypes(mcfg: ModelConfig, cfg: tcfg.TrainConfig, params):
  mcfg = mcfg.replace(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                      attention_impl=cfg.model.attention_impl)
  if mcfg.ssm is not None and cfg.model.scan_impl != mcfg.ssm.scan_impl:
    import dataclasses
    mcfg = mcfg.replace(ssm=dataclasses.replace(mcfg.ssm, scan_impl=cfg.model.scan_impl))
  pdt = jax.numpy.dtype(cfg.model.param_dtype)
  params = jax.tree.map(lambda x: x.astype(pdt) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x,
                        params)
  return mcfg, params


def build_models(cfg: tcfg.TrainConfig, teacher_dir: str | None, init_dir: str | None, log=print):
  """-> (student_params, student_cfg, tokenizer, teacher (params, cfg) or None, frozen (params, cfg) or None)."""
  from hybrid_jax.model.init import hybrid_config, init_from_teacher
  need_teacher = stages.uses_teacher(cfg) or init_dir is None
  teacher = None
  if need_teacher:
    if not teacher_dir:
      raise ConfigError(f"stage {cfg.stage!r} needs --teacher" + ("" if init_dir else " (or --init)"))
    tp, tc, ttok = _load(teacher_dir, "teacher")
    if tc.is_hybrid:
      raise ConfigError(f"--teacher {teacher_dir} is a hybrid; the teacher must be a plain Llama")
    teacher = (tp, tc, ttok)
  key = jax.random.key(cfg.train.seed)
  if init_dir and cfg.model.num_layers is not None:
    raise ConfigError("model.num_layers applies when the student is made from the teacher, not with --init")
  if init_dir:
    sp, sc, stok = _load(init_dir, "--init")
    if teacher is not None:
      check_tokenizers((teacher[1], teacher[2], teacher_dir), (sc, stok, init_dir))
    want = _target_attn(cfg, sc.num_hidden_layers)
    have = sc.attn_layers if sc.attn_layers is not None else tuple(range(sc.num_hidden_layers))
    if want != tuple(have) and cfg.stage != "align":
      # the layout belongs to the model: only stage align changes it (progressive alignment)
      log(f"note: --init {init_dir} keeps attention in layers {list(have)}; the config's layout {list(want)} "
          f"applies only when creating a hybrid or in stage align")
    elif want != tuple(have):
      if teacher is None:
        raise ConfigError("changing the attention layout in align needs --teacher")
      # progressive alignment: keep the existing mixers, initialise newly replaced layers from attention
      new_cfg = hybrid_config(teacher[1], want, cfg.model.variant)
      new = init_from_teacher(teacher[0], teacher[1], new_cfg, key, cfg.model.mixer_init)
      for i in set(new_cfg.ssm_layers) & set(sc.ssm_layers):  # the whole layer, as the reference reloads it
        new[f"layers_{i}"] = sp[f"layers_{i}"]
      log(f"align: attention layers {list(have)} -> {list(want)} (Mamba layers of earlier stages kept)")
      sp, sc = new, new_cfg
    tokenizer = stok if stok is not None else (teacher[2] if teacher else None)
  else:
    tp, tc, ttok = teacher
    n = cfg.model.num_layers
    if n is not None:  # a shallower student (a draft): the teacher's first n layers, its norm and head
      if n > tc.num_hidden_layers:
        raise ConfigError(f"model.num_layers {n} > the teacher's {tc.num_hidden_layers} layers")
      tp = {k: v for k, v in tp.items() if not k.startswith("layers_") or int(k[len("layers_"):]) < n}
      tc = tc.replace(num_hidden_layers=n)
    sc = hybrid_config(tc, _target_attn(cfg, tc.num_hidden_layers), cfg.model.variant)
    sp = init_from_teacher(tp, tc, sc, key, cfg.model.mixer_init)
    tokenizer = ttok
    log(f"student initialised from teacher {teacher_dir}: attention layers {list(sc.attn_layers)}, "
        f"{sc.ssm.variant} elsewhere ({cfg.model.mixer_init} mixer init)")
  sc, sp = _with_dtypes(sc, cfg, sp)
  frozen = None
  if cfg.stage == "dpo":
    frozen = (sp, sc)  # the reference = the starting model (immutable arrays: no copy needed)
  elif stages.uses_teacher(cfg):
    tc, tp = _with_dtypes(teacher[1], cfg, teacher[0])
    frozen = (tp, tc)
  return sp, sc, tokenizer, teacher, frozen


# ---- data --------------------------------------------------------------------------------------

def resolve_data(cfg: tcfg.TrainConfig, teacher_dir: str | None, cache_dir: str, init_dir: str | None = None,
                 log=print) -> tcfg.TrainConfig:
  """Fills data.paths with the teacher-generated default data when the recipe gives none (dpo: pairs of the
  teacher's answer (chosen) and the --init student's own answer (rejected))."""
  if cfg.data.get("paths"):
    return cfg
  from hybrid_jax.data import default_data
  if not teacher_dir:
    raise ConfigError("data.paths is empty: give data files, or --teacher to generate the default data")
  log(f"data.paths empty: using the default teacher-generated data (cache {cache_dir})")
  dd = cfg.default_data
  kw = {"n_train": dd.n_train, "n_eval": dd.n_eval, "max_new_tokens": dd.max_new_tokens,
        "batch_size": dd.batch_size, "answer_temperature": dd.answer_temperature, "answer_top_p": dd.answer_top_p}
  if cfg.stage == "dpo":
    if not init_dir:
      raise ConfigError("dpo with default data needs --init (the student whose answers become 'rejected')")
    paths = default_data.ensure_default_dpo_data(teacher_dir, init_dir, cache_dir, **kw)
  else:
    paths = default_data.ensure_default_data(teacher_dir, cache_dir, **kw)
  data = dict(cfg.data)
  data["paths"] = [paths["train"]]
  if dd.n_text and cfg.stage != "dpo":
    data["paths"].append(default_data.ensure_default_texts(
        teacher_dir, cache_dir, n=dd.n_text, max_new_tokens=dd.text_tokens, batch_size=dd.batch_size)["train"])
  if not data.get("eval_paths") and not data.get("eval_fraction") and paths.get("eval"):
    data["eval_paths"] = [paths["eval"]]
  return cfg.replace(data=data)


def build_data(cfg: tcfg.TrainConfig, tokenizer, log=print):
  from hybrid_jax.data import load_eval_batches, load_records, make_dataset
  dcfg = cfg.data_config
  if tokenizer is None:
    raise ConfigError("no tokenizer: the teacher / --init model dir has no tokenizer files")
  records = load_records(dcfg, "train")  # reads + validates now: a missing file fails before any compile
  rows = None  # one process: all rows; several: the rows its devices hold in the mesh loop.train makes
  if jax.process_count() > 1:
    rows = shd.process_batch_rows(shd.make_mesh(dataclasses.asdict(cfg.mesh)), dcfg.batch_size)
  train_iter = iter(make_dataset(dcfg, tokenizer, seed=dcfg.seed, split="train", records=records, rows=rows))
  eval_batches = None
  if dcfg.eval_paths or dcfg.eval_fraction:
    eval_batches = load_eval_batches(dcfg, tokenizer, cfg.train.eval_batches, rows=rows)
  else:
    log("no eval split (data.eval_paths / data.eval_fraction): held-out perplexity is not reported")
  return train_iter, eval_batches


# ---- main --------------------------------------------------------------------------------------

def config_with_data(args: argparse.Namespace, log=print) -> tcfg.TrainConfig:
  """The recipe with its data files: the default data generated into the (shared) cache when the recipe names
  none, by process 0 first; the training records read and checked, so bad data fails before any model loads."""
  cfg = tcfg.load(args.config, args.overrides, stage=args.stage)
  with distributed.primary_first("default-data"):
    cfg = resolve_data(cfg, args.teacher, args.cache_dir, args.init, log)
  from hybrid_jax.data import load_records
  load_records(cfg.data_config, "train")
  return cfg


def prepare_data(args: argparse.Namespace, log=print) -> list[str]:
  """--data-only: the recipe's data files, so that runs started side by side later all find the default data
  in the cache instead of each generating it."""
  cfg = config_with_data(args, log)
  return list(cfg.data["paths"]) + list(cfg.data.get("eval_paths") or [])


def run(args: argparse.Namespace, log=print) -> loop.TrainResult:
  """One process of the run (all of it, or one of several: see hybrid_jax.train.distributed)."""
  distributed.initialize(args)
  with distributed.run_scope():
    return _run(args, log if distributed.is_primary() else lambda *_: None)


def _run(args: argparse.Namespace, log) -> loop.TrainResult:
  cfg = config_with_data(args, log)
  sp, sc, tokenizer, teacher, frozen = build_models(cfg, args.teacher, args.init, log)
  train_iter, eval_batches = build_data(cfg, tokenizer, log)
  output = args.output or cfg.train.output
  if args.overwrite and args.resume:
    raise ConfigError("--overwrite and --resume are exclusive")
  if args.overwrite and distributed.is_primary() and os.path.isdir(os.path.join(output, "checkpoints")):
    import shutil
    log(f"--overwrite: removing {os.path.join(output, 'checkpoints')}")
    shutil.rmtree(os.path.join(output, "checkpoints"))
  os.makedirs(output, exist_ok=True)
  if distributed.is_primary():
    import yaml
    with open(os.path.join(output, "train_config.yaml"), "w") as f:
      yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
  distributed.barrier("output-ready")  # nobody looks for checkpoints before --overwrite removed them

  def save_model_fn(params, directory):
    from hybrid_jax.checkpoint import save_model
    extra = {"teacher_config.json": teacher[1].to_hf()} if teacher is not None else None
    if jax.process_index() == 0:
      save_model(directory, params, sc, tokenizer, extra=extra)

  try:
    return loop.train(cfg, student_params=sp, student_cfg=sc,
                      frozen_params=frozen[0] if frozen else None, frozen_cfg=frozen[1] if frozen else None,
                      train_iter=train_iter, eval_batches=eval_batches, output_dir=output, resume=args.resume,
                      save_model_fn=save_model_fn, progress=not args.no_progress, log=log)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise ConfigError(out_of_memory_message(cfg, output)) from e


def out_of_memory_message(cfg: tcfg.TrainConfig, output: str) -> str:
  """What to change when a step does not fit in device memory (the recipe keys), and where the last
  checkpoint is."""
  d = cfg.data_config
  return (f"out of device memory: a step of data.batch_size={d.batch_size} x data.seq_len={d.seq_len} tokens "
          f"(train.grad_accum={cfg.train.grad_accum}, model.remat={cfg.model.remat}) does not fit; raise "
          f"train.grad_accum, lower data.batch_size or data.seq_len, or set model.remat=dots or full. Checkpoints "
          f"saved so far are in {os.path.join(output, 'checkpoints')} (continue with --resume)")


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  from hybrid_jax.checkpoint import CheckpointError
  from hybrid_jax.compile_cache import enable_compilation_cache
  from hybrid_jax.data import DataError
  from hybrid_jax.errors import error_line
  enable_compilation_cache()
  try:
    if args.data_only:
      print("\n".join(prepare_data(args)))
      return 0
    res = run(args)
  except (ConfigError, DataError, CheckpointError, OSError) as e:  # each names its file
    print(error_line(e), file=sys.stderr)
    return 2
  if res.interrupted:
    print(f"interrupted at step {res.step}; checkpoint saved. Continue with the same command plus --resume",
          file=sys.stderr)
    return 130
  return 0
