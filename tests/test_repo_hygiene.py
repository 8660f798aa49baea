"""The repository speaks about the product: no words of the environment it was built in, no dead doc references."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("README.md", "docs", "bench", "hybrid_jax", "configs")
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
FORBIDDEN = re.compile(r"session|device time|nvidia-h[0-9]+-x|issue [0-9]|\.xfer|tmp.stash|shared/SPEC",
                       re.IGNORECASE)
SPEC_CITE = re.compile(r"\bSPEC\b")  # numerics are cited as docs/DESIGN.md sections
MD_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
DOC_PATH = re.compile(r"(?<![\w/.])docs/[\w.-]+\.md\b")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def _text_files(root: str):
  """(repo-relative path, text) of every readable text file under `root` (a file or a folder of the repo)."""
  path = os.path.join(REPO, root)
  if os.path.isfile(path):
    paths = [path]
  else:
    paths = []
    for d, dirs, files in os.walk(path):
      dirs[:] = sorted(x for x in dirs if x not in SKIPPED_DIRS)
      paths += [os.path.join(d, f) for f in sorted(files)]
  for p in paths:
    with open(p, "rb") as f:
      data = f.read()
    if b"\0" in data:
      continue  # binary
    try:
      yield os.path.relpath(p, REPO), data.decode("utf-8")
    except UnicodeDecodeError:
      continue


def _doc_files():
  docs = os.path.join(REPO, "docs")
  names = sorted(f for f in os.listdir(docs) if f.endswith(".md")) if os.path.isdir(docs) else []
  return ["README.md"] + [os.path.join("docs", f) for f in names]


def _outside_code_fences(text: str):
  """(line number, line) of the lines of a markdown text that are not inside ``` fences."""
  fenced = False
  for i, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith("```"):
      fenced = not fenced
      continue
    if not fenced:
      yield i, line


def test_no_build_environment_words():
  hits = []
  for root in SCANNED:
    for rel, text in _text_files(root):
      for i, line in enumerate(text.splitlines(), 1):
        if FORBIDDEN.search(line) or SPEC_CITE.search(line):
          hits.append(f"{rel}:{i}: {line.strip()[:140]}")
  assert not hits, f"{len(hits)} line(s) name the build environment or cite SPEC (cite docs/DESIGN.md §N):\n" + "\n".join(hits)


def test_doc_links_point_to_existing_files():
  """Every relative link of README.md and docs/*.md resolves."""
  broken = []
  for rel in _doc_files():
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
      text = f.read()
    base = os.path.dirname(os.path.join(REPO, rel))
    for i, line in _outside_code_fences(text):
      for target in MD_LINK.findall(line):
        if EXTERNAL.match(target) or target.startswith("#"):
          continue
        if not os.path.exists(os.path.normpath(os.path.join(base, target.split("#", 1)[0]))):
          broken.append(f"{rel}:{i}: link to {target}")
  assert not broken, f"{len(broken)} link(s) to missing files:\n" + "\n".join(broken)


def test_named_docs_exist():
  """Docs named by their repository path (`docs/X.md`) in docs, code, configs or benchmarks exist."""
  missing = []
  for root in SCANNED:
    for rel, text in _text_files(root):
      for i, line in enumerate(text.splitlines(), 1):
        missing += [f"{rel}:{i}: {path}" for path in DOC_PATH.findall(line)
                    if not os.path.exists(os.path.join(REPO, path))]
  assert not missing, f"{len(missing)} mention(s) of missing docs:\n" + "\n".join(missing)


def test_patterns_find_what_they_look_for():
  """Each pattern matches what it is for and not its look-alikes."""
  line = "see [design](DESIGN.md#3-the-hybrid), [web](https://example.com), [top](#usage) and `docs/X.md`"
  targets = MD_LINK.findall(line)
  assert targets == ["DESIGN.md#3-the-hybrid", "https://example.com", "#usage"]
  assert [t for t in targets if not EXTERNAL.match(t) and not t.startswith("#")] == ["DESIGN.md#3-the-hybrid"]
  assert DOC_PATH.findall(line) == ["docs/X.md"]
  assert FORBIDDEN.search("raw output in .xfer/ parts") and FORBIDDEN.search("the device time ran out")
  assert not FORBIDDEN.search("the paper's Table 5") and FORBIDDEN.search("the device timeline")
  assert SPEC_CITE.search("(SPEC section 4)") and not SPEC_CITE.search("bash bench/run_gpu.sh spec-default")
