"""sample.py: streamed sampling from a checkpoint — greedy equals the cache-less model, EOS, top-k/top-p, prompts,
the tokenizer inside the checkpoint, and one-line errors. Uses the tiny tokenizer and model of conftest.py."""

import copy
import os
import random
import subprocess
import sys

import pytest
import torch

import sample
from conftest import RunsCode, make_checkpoint, make_corpus, run_main, train_tokenizer
from model import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path, m, tok = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    return {"ckpt": str(path), "model": m, "tok": tok}


def one_line_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as e:
        run_main(sample, argv)
    message = str(e.value)  # the line printed: SystemExit("error: ...") exits 1, a setting error 2
    assert e.value.code != 0
    assert message.startswith("error: ") and "\n" not in message.strip(), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def collect(m, tok, ids, **kw):
    pieces = []
    samples, _ = sample.stream_sample(m, tok, ids, pieces.append, **kw)
    return "".join(pieces), samples[0]


# -----------------------------------------------------------------------------

def test_greedy_equals_generate_without_cache(world):
    m, tok = world["model"], world["tok"]
    ids = sample.prompt_ids(tok, "Lily saw a", m.args.max_seq_len)
    text, new = collect(m, tok, ids, max_new_tokens=100, temperature=0)  # 100 > max_seq_len: the window slides
    slow = m.generate(torch.tensor([ids]), 100, temperature=0, eos_id=tok.eos_id, use_cache=False)[0].tolist()
    assert ids + new == slow[:len(ids) + len(new)]
    assert len(new) == 100 or new[-1] == tok.eos_id
    assert text == tok.decode(ids + new) and text.startswith("Lily saw a")
    assert len(set(new)) > 5  # trained: real text, not one token repeated


def test_eos_stops_and_is_not_printed(world):
    m, tok = world["model"], world["tok"]
    ids = sample.prompt_ids(tok, "Tom saw a", m.args.max_seq_len)
    _, greedy = collect(m, tok, ids, max_new_tokens=12, temperature=0)
    tok_eos = copy.copy(tok)
    tok_eos.eos_id = greedy[4]  # declare the 5th greedy token the end of text
    first = greedy.index(greedy[4])
    text, new = collect(m, tok_eos, ids, max_new_tokens=12, temperature=0)
    assert new == greedy[:first + 1]
    assert text == tok.decode(ids + greedy[:first])


def test_top_k_and_top_p_stay_in_bounds(world):
    m, tok = world["model"], world["tok"]
    ids = sample.prompt_ids(tok, "Ana saw", m.args.max_seq_len)
    _, greedy = collect(m, tok, ids, max_new_tokens=20, temperature=0)
    torch.manual_seed(1)
    assert collect(m, tok, ids, max_new_tokens=20, temperature=1.5, top_k=1)[1] == greedy
    assert collect(m, tok, ids, max_new_tokens=20, temperature=1.5, top_p=1e-6)[1] == greedy
    # a token may be drawn only if fewer than k tokens are likelier / the likelier ones add up to less than p
    for kw, check in [({"top_k": 3}, lambda probs, t: (probs > probs[t]).sum() < 3),
                      ({"top_p": 0.5}, lambda probs, t: probs[probs > probs[t]].sum() < 0.5)]:
        _, new = collect(m, tok, ids, max_new_tokens=30, temperature=2.0, **kw)
        seq = ids + new
        for t in range(len(ids), len(seq)):
            probs = torch.softmax(m(torch.tensor([seq[:t]]))[0, -1] / 2.0, -1)
            assert check(probs, seq[t]), (kw, t)


def test_streaming_writes_each_token_as_it_is_sampled(world):
    m, tok = world["model"], world["tok"]
    forwards = []  # every pass through the model, the prompt's prefill or one decode step, embeds its tokens once
    hook = m.tok_embeddings.register_forward_hook(lambda *_: forwards.append(1))
    writes = []
    ids = sample.prompt_ids(tok, "Zoë saw a café", m.args.max_seq_len)
    try:
        (new,), _ = sample.stream_sample(m, tok, ids, lambda s: writes.append((len(forwards), s)), max_new_tokens=25,
                                         temperature=0)
    finally:
        hook.remove()
    assert writes[0] == (0, "Zoë saw a café")  # the prompt comes first, before any forward pass
    # one write per sampled token, right after the pass that produced it
    assert [n for n, _ in writes[1:len(new) + 1]] == list(range(1, len(new) + 1))
    assert "".join(s for _, s in writes) == tok.decode(ids + [t for t in new if t != tok.eos_id])


def test_text_stream_handles_byte_fallback_and_spaces(world):
    tok = world["tok"]
    rng = random.Random(0)
    special = {tok.bos_id, tok.eos_id, 0}
    texts = ["a 🙂 star 🌟", "ß → ∑ 日本語 🙂🙂", "  two  spaces\nand a line "]
    assert all(any(tok.sp.is_byte(i) for i in tok.encode(t)) for t in texts[:2])  # characters only seen as bytes
    for text in texts:
        ids = tok.encode(text, bos=True)
        stream = sample.TextStream(tok, ids[:1])
        pieces = [stream.add(i) for i in ids[1:]] + [stream.take(final=True)]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)  # never half a character
    for _ in range(200):  # any id sequence, valid UTF-8 or not: the pieces add up to the full decode
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        ids = [i for i in ids if i not in special]
        stream = sample.TextStream(tok, [tok.bos_id])
        assert "".join([stream.add(i) for i in ids] + [stream.take(final=True)]) == tok.decode(ids)


def test_file_prompt_and_tokenizer_from_checkpoint(world, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Max saw a little boat\n", encoding="utf-8")  # the editor's newline is not part of it
    run_main(sample, ["--ckpt", world["ckpt"], f"--start=FILE:{prompt}", "--temperature=0", "--max_new_tokens=15"])
    from_file = capsys.readouterr()
    run_main(sample, ["--ckpt", world["ckpt"], "--start=Max saw a little boat", "--temperature=0",
                      "--max_new_tokens=15"])
    inline = capsys.readouterr()
    assert from_file.out == inline.out and from_file.out.startswith("Max saw a little boat")
    assert "tokens/s" in from_file.err
    # the same tokenizer given explicitly changes nothing; a different one of the same size gets a warning
    tok_path = tmp_path / "tok.model"
    tok_path.write_bytes(world["tok"].model_bytes)
    run_main(sample, ["--ckpt", world["ckpt"], f"--tokenizer={tok_path}", "--start=Max saw a little boat",
              "--temperature=0", "--max_new_tokens=15"])
    explicit = capsys.readouterr()
    assert explicit.out == inline.out and "warning" not in explicit.err
    other = tmp_path / "other.model"
    other.write_bytes(train_tokenizer(make_corpus(seed=2), 320))
    run_main(sample, ["--ckpt", world["ckpt"], f"--tokenizer={other}", "--max_new_tokens=5"])
    assert "not the tokenizer this model was trained with" in capsys.readouterr().err
    # a checkpoint without its tokenizer needs --tokenizer
    ck = torch.load(world["ckpt"], weights_only=True)
    del ck["tokenizer"]
    bare = tmp_path / "bare.pt"
    torch.save(ck, bare)
    one_line_error(capsys, ["--ckpt", str(bare)], "holds no tokenizer", "--tokenizer=")
    run_main(sample, ["--ckpt", str(bare), f"--tokenizer={tok_path}", "--start=Max saw a little boat",
                      "--temperature=0", "--max_new_tokens=15"])
    assert capsys.readouterr().out == inline.out


def test_samples_are_separated_and_seeded(world, capsys):
    argv = ["--ckpt", world["ckpt"], "--start=Lily", "--num_samples=3", "--max_new_tokens=20", "--seed=7"]
    run_main(sample, argv)
    first = capsys.readouterr().out
    run_main(sample, argv)
    assert capsys.readouterr().out == first  # same seed, same samples
    samples = first.split("\n" + "-" * 40 + "\n")
    assert len(samples) == 3 and all(s.startswith("Lily") for s in samples)
    run_main(sample, argv[:-1] + ["--seed=8"])
    assert capsys.readouterr().out != first


def test_num_samples_run_as_one_batch(world, capsys, monkeypatch):
    batches = []
    plain = Transformer.generate_stream
    monkeypatch.setattr(Transformer, "generate_stream", lambda self, idx, *a, **k: batches.append(idx.shape[0]) or
                        plain(self, idx, *a, **k))
    run_main(sample, ["--ckpt", world["ckpt"], "--start=Tom saw", "--num_samples=4", "--max_new_tokens=12",
                      "--temperature=0"])
    out, err = capsys.readouterr()
    assert batches == [4]  # one generation of four rows, not four generations
    assert out.endswith("\n")
    samples = out[:-1].split("\n" + "-" * 40 + "\n")
    assert len(samples) == 4 and len(set(samples)) == 1 and samples[0].startswith("Tom saw")  # greedy: all equal
    run_main(sample, ["--ckpt", world["ckpt"], "--start=Tom saw", "--max_new_tokens=12", "--temperature=0"])
    assert capsys.readouterr().out == samples[0] + "\n"  # a row of the batch is what it would be alone
    assert "4 samples in one batch" in err and "tokens/s" in err and "warm-up" in err


def test_batched_samples_end_at_their_own_eos(world):
    m, tok = world["model"], world["tok"]
    ids = sample.prompt_ids(tok, "Lily", m.args.max_seq_len)
    torch.manual_seed(3)
    samples, _ = sample.stream_sample(m, tok, ids, lambda s: None, max_new_tokens=40, temperature=1.0, num_samples=6)
    assert len(samples) == 6 and len(set(map(tuple, samples))) > 1  # rows sample independently
    assert any(s[-1] == tok.eos_id for s in samples) and len(set(map(len, samples))) > 1  # ended at different steps
    for s in samples:
        assert tok.eos_id not in s[:-1]  # nothing after a sample's own end of text (the batch's padding is dropped)
        assert len(s) == 40 or s[-1] == tok.eos_id


def test_long_prompt_is_cropped_with_a_warning(world, capsys):
    long = " ".join(["Lily saw a red ball in the park."] * 20)
    run_main(sample, ["--ckpt", world["ckpt"], f"--start={long}", "--temperature=0", "--max_new_tokens=5"])
    out, err = capsys.readouterr()
    assert "warning: the prompt is" in err and "keeping its last 64 tokens" in err
    tok = world["tok"]
    kept = tok.decode(tok.encode(long, bos=True)[-64:])
    assert out.startswith(kept) and long.endswith(kept) and len(out) > len(kept)


def test_error_paths_are_one_line(world, tmp_path, capsys):
    one_line_error(capsys, ["--ckpt", str(tmp_path / "nope.pt")], "no checkpoint at")
    truncated = tmp_path / "truncated.pt"
    data = open(world["ckpt"], "rb").read()
    truncated.write_bytes(data[:len(data) // 2])
    one_line_error(capsys, ["--ckpt", str(truncated)], "truncated")
    not_ours = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, not_ours)
    one_line_error(capsys, ["--ckpt", str(not_ours)], "not a tinyllm checkpoint")
    mangled = tmp_path / "mangled.pt"
    ck = torch.load(world["ckpt"], weights_only=True)
    del ck["model"]["norm.weight"]
    torch.save(ck, mangled)
    one_line_error(capsys, ["--ckpt", str(mangled)], "do not fit its model_args")
    other_tok = tmp_path / "other.model"
    other_tok.write_bytes(train_tokenizer(make_corpus(seed=1), 350))
    one_line_error(capsys, ["--ckpt", world["ckpt"], f"--tokenizer={other_tok}"], "350 pieces", "vocab_size is 320")
    one_line_error(capsys, ["--ckpt", world["ckpt"], f"--tokenizer={tmp_path / 'no.model'}"], "no tokenizer at")
    one_line_error(capsys, ["--ckpt", world["ckpt"], f"--start=FILE:{tmp_path / 'missing.txt'}"],
                   "cannot read the prompt file")
    for bad, fragment in [("--temperature=-1", "--temperature"), ("--top_p=0", "--top_p"), ("--top_k=-2", "--top_k"),
                          ("--num_samples=0", "--num_samples")]:
        one_line_error(capsys, ["--ckpt", world["ckpt"], bad], fragment)


def test_checkpoint_with_pickled_code_is_refused_unrun(world, tmp_path, capsys):
    ck = torch.load(world["ckpt"], weights_only=True)
    marker = tmp_path / "was_run"
    ck["config"]["payload"] = RunsCode(str(marker))
    evil = tmp_path / "evil.pt"
    torch.save(ck, evil)
    one_line_error(capsys, ["--ckpt", str(evil)], "pickled Python objects", "nothing in it was executed")
    assert not marker.exists()


def test_command_line(world, tmp_path):
    """The documented command (`--ckpt path`, a space), streamed to a pipe; errors have no traceback."""
    run = lambda *argv: subprocess.run([sys.executable, "sample.py", *argv], cwd=REPO, capture_output=True,
                                       text=True, timeout=120)
    ok = run("--ckpt", world["ckpt"], "--start", "Tom saw", "--num_samples", "2", "--max_new_tokens", "10",
             "--temperature=0")
    assert ok.returncode == 0, ok.stderr
    first, second = ok.stdout.split("-" * 40 + "\n")
    assert first == second and first.startswith("Tom saw")
    assert "tokens/s" in ok.stderr.splitlines()[-1]
    bad = run("--ckpt", str(tmp_path / "missing.pt"))
    assert bad.returncode != 0 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: no checkpoint at")
    bad = run("--ckpt", world["ckpt"], "--top_p=0")  # a setting error: exit code 2, as the configurator's
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: --top_p must be in (0, 1] (1.0 turns "
                                                                        "it off), not 0.0"]


def test_stdout_that_fails_is_one_line(world):
    """A full disk behind stdout (/dev/full) is a one-line error, not a traceback."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this platform")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "sample.py", "--ckpt", world["ckpt"], "--max_new_tokens=5"], cwd=REPO,
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1] == "error: could not write the sample to stdout (No space left on device)"


def test_stdout_encoding_without_the_characters_replaces_them(world):
    """stdout in an encoding that lacks some characters (cp1252: Windows redirecting to a file) prints '?' for
    them instead of failing with UnicodeEncodeError."""
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", world["ckpt"], "--start", "Zoë: 日本語 🙂",
                        "--max_new_tokens=5", "--temperature=0"], cwd=REPO, capture_output=True, timeout=120,
                       env={**os.environ, "PYTHONIOENCODING": "cp1252"})
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode("cp1252").startswith("Zoë: ??? ?")


def test_ckpt_a_run_folder_names_the_checkpoints_in_it(world, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    one_line_error(capsys, ["--ckpt", str(run)], f"{run} is a directory", "no ckpt.pt or best.pt")
    (run / "best.pt").write_bytes(b"")
    message = one_line_error(capsys, ["--ckpt", str(run)])
    assert message == f"error: {run} is a directory; pass {run / 'best.pt'}"
    (run / "ckpt.pt").write_bytes(b"")
    message = one_line_error(capsys, ["--ckpt", str(run)])
    assert message == f"error: {run} is a directory; pass {run / 'ckpt.pt'} or {run / 'best.pt'}"
