"""What several test files share: a tiny world (text, a tokenizer trained by preprocess.py's own function, a model
trained on it, saved as a checkpoint), running an entry script's main() in this process, a pickled payload that
would run code, and a file-size limit that makes writes fail as on a full disk."""

import importlib
import random
import signal

import pytest
import torch

from configurator import configure
from model import ModelArgs, Transformer, checkpoint_dict, save_checkpoint
from preprocess import Tokenizer, train_sentencepiece


# -----------------------------------------------------------------------------
# a tiny world: text, a sentencepiece BPE tokenizer trained on it, a model trained on it (test_sample, test_export)

def make_corpus(seed=0, n=400):
    rng = random.Random(seed)
    names = ["Lily", "Tom", "Zoë", "Max", "Ana"]
    things = ["red ball", "big dog", "café", "little boat", "shiny star 🌟", "naïve cat"]
    places = ["park", "garden", "sea", "forest"]
    docs = []
    for _ in range(n):
        name, thing, place = rng.choice(names), rng.choice(things), rng.choice(places)
        docs.append(f"{name} saw a {thing} in the {place}. {name} was happy.\n"
                    f"They played with {rng.randint(1, 99)} friends.")
    return docs


def train_tokenizer(docs, vocab_size):
    """The model bytes of a tokenizer trained by preprocess.py's own function (one thread: the same every run)."""
    return train_sentencepiece(docs, vocab_size, num_threads=1)


def train_model(tok, docs, steps=60, **shape):
    """A small GQA model trained briefly on BOS + doc + EOS sequences, so greedy output is text, not noise."""
    torch.manual_seed(0)
    args = ModelArgs(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": tok.vocab_size,
                        "max_seq_len": 64, **shape})
    m = Transformer(args)
    stream = torch.tensor([i for d in docs for i in tok.encode(d, bos=True, eos=True)])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    T = args.max_seq_len
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains no faster on two threads, and far slower on a busy machine
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(stream) - T - 1, (16,), generator=g)
            x = torch.stack([stream[s:s + T] for s in starts])
            y = torch.stack([stream[s + 1:s + T + 1] for s in starts])
            m(x, y)
            opt.zero_grad(set_to_none=True)
            m.last_loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return m.eval(), args


def make_checkpoint(path, vocab_size=320, **shape):
    """(checkpoint path, model, Tokenizer) for a freshly trained tiny model, saved as train.py saves it."""
    docs = make_corpus()
    tok = Tokenizer.from_bytes(train_tokenizer(docs, vocab_size))
    m, args = train_model(tok, docs, **shape)
    save_checkpoint(checkpoint_dict(m, args, tokenizer=tok.model_bytes, iter_num=60, best_val_loss=1.0,
                                    config={"vocab_size": vocab_size}), path)
    return path, m, tok


# -----------------------------------------------------------------------------
# helpers

def run_main(module, argv):
    """An entry script's command line (sample.py, export.py), in this process: fresh settings each time."""
    mod = importlib.reload(module)
    configure(vars(mod), argv)
    mod.main()


class RunsCode:
    """Unpickling this would call open(path, "w"): a stand-in for arbitrary code in a malicious checkpoint; loading
    must refuse it, and the file must not appear."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def limited_file_size(limit):
    """preexec_fn: writes beyond limit bytes fail (EFBIG), as on a full disk, inside the real program."""
    resource = pytest.importorskip("resource")

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply
