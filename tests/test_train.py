"""train.py end to end on CPU: loss falls, exact resume after SIGKILL, SIGTERM, NaN skipping, DDP on gloo, ..."""

import errno
import glob
import json
import math
import os
import random
import re
import importlib.util
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train as train_module
from configurator import configure
from model import ModelArgs, Transformer, load_checkpoint, save_checkpoint
from conftest import limited_file_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 320
WORDS = ("the king queen lord lady sword crown night day love death heart blood fair sweet good noble " +
         "speak come go see know hear thou thee thy my our your his her doth hath shall will").split()


def run(args, cwd, **kw):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small corpus with learnable structure, tokenized with a 320-token vocabulary."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = []
    for _ in range(400):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                 for _ in range(rng.randint(3, 8))]
        docs.append("\n".join(lines))
    (root / "raw").mkdir()
    (root / "raw" / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    data = root / "data"
    for verb in (["train_vocab"], ["pretokenize", "--val_fraction=0.1"]):
        r = run(["preprocess.py", *verb, f"--vocab_size={VOCAB}", f"--input={root / 'raw'}", f"--data_dir={data}"],
                ROOT)
        assert r.returncode == 0, r.stderr
    return str(data)


def settings(data_dir, out_dir, **extra):
    s = dict(data_dir=data_dir, out_dir=str(out_dir), data_source="custom", vocab_size=VOCAB, max_seq_len=32,
             dim=32, n_layers=2, n_heads=4, n_kv_heads=2, batch_size=4, gradient_accumulation_steps=2,
             learning_rate=3e-3, min_lr=3e-4, warmup_iters=5, max_iters=40, eval_interval=20, eval_iters=4,
             log_interval=5, device="cpu", compile=False)
    s.update(extra)
    return [f"--{k}={v}" for k, v in s.items()]


def train_cli(data_dir, out_dir, **extra):
    r = run(["train.py", *settings(data_dir, out_dir, **extra)], ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def wait_for_metrics(proc, out_dir, lines, timeout):
    """Wait (at most timeout seconds) until the running proc has written this many lines of metrics.jsonl."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(out_dir, "metrics.jsonl")) and len(metrics(out_dir)) >= lines:
            return
        time.sleep(0.05)


def test_loss_falls_and_outputs_are_written(data_dir, tmp_path):
    out = tmp_path / "run"
    r = train_cli(data_dir, out, max_iters=60, eval_interval=30)
    assert "tokens per iteration: 256 = 2 accumulation x 4 batch x 32 tokens" in r.stdout
    evals = [m for m in metrics(out) if "val_loss" in m]
    assert [m["iter"] for m in evals] == [0, 30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert evals[-1]["val_bpb"] > 0
    for name in ("ckpt.pt", "best.pt"):
        ckpt = load_checkpoint(out / name)
        assert ckpt["iter_num"] == 60 or name == "best.pt"
        assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
        assert ckpt["tokenizer"] == open(os.path.join(data_dir, f"tok{VOCAB}.model"), "rb").read()
        assert ckpt["config"]["batch_size"] == 4 and ckpt["model_args"]["dim"] == 32
    assert "next: python sample.py --ckpt" in r.stdout


def test_metrics_schema(data_dir, tmp_path):
    out = tmp_path / "run"
    # also: the old name of keep_best, in its old (opposite) sense, still works with a one-line note
    r = train_cli(data_dir, out, max_iters=10, eval_interval=10, log_interval=5, always_save_checkpoint=True)
    assert "note: --always_save_checkpoint is now --keep_best=False" in r.stderr.splitlines()
    assert (out / "ckpt.pt").exists() and not (out / "best.pt").exists()
    records = metrics(out)
    logs = [m for m in records if "loss" in m]
    evals = [m for m in records if "val_loss" in m]
    assert [m["iter"] for m in logs] == [5, 10]
    for m in logs:
        assert {"iter", "tokens", "loss", "lr", "grad_norm", "ms", "tok_per_s", "mfu"} <= set(m)
        assert m["tokens"] == m["iter"] * 256 and m["mfu"] is None  # no MFU on a CPU
        assert m["lr"] > 0 and m["grad_norm"] > 0 and m["ms"] > 0 and m["tok_per_s"] > 0
    for m in evals:
        assert set(m) == {"iter", "tokens", "train_loss", "val_loss", "val_bpb"}
    if importlib.util.find_spec("matplotlib"):
        assert (out / "loss.png").exists()


def test_lr_schedule(monkeypatch):
    for k, v in dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, lr_decay_iters=0,
                     lr_schedule="cosine", wsd_decay_frac=0.2).items():
        monkeypatch.setattr(train_module, k, v)
    lr = train_module.lr_at
    assert 0 < lr(0) < lr(1) < lr(9) < 1e-3  # warmup starts above zero
    assert lr(10) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx(5.5e-4)  # halfway down the cosine
    assert lr(110) == pytest.approx(1e-4) and lr(500) == pytest.approx(1e-4)
    monkeypatch.setattr(train_module, "lr_schedule", "wsd")
    assert lr(10) == lr(50) == lr(88) == pytest.approx(1e-3)  # stable until the last 20% (from 88)
    assert lr(99) == pytest.approx(1e-3 + (1e-4 - 1e-3) * 11 / 22)
    assert lr(110) == pytest.approx(1e-4)
    monkeypatch.setattr(train_module, "lr_schedule", "constant")
    assert lr(100) == pytest.approx(1e-3)


def test_accumulation_in_train_py_equals_one_big_batch(data_dir, tmp_path):
    # the batch stream hands out windows in order, so 2 micro-batches of 4 are the same 8 windows as one batch of 8
    one = tmp_path / "one"
    train_cli(data_dir, one, batch_size=8, gradient_accumulation_steps=1, max_iters=1, log_interval=1)
    two = tmp_path / "two"
    train_cli(data_dir, two, batch_size=4, gradient_accumulation_steps=2, max_iters=1, log_interval=1)
    a, b = [[m for m in metrics(d) if "loss" in m][0] for d in (one, two)]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert a["tokens"] == b["tokens"] == 8 * 32


def tiny_training():
    """A seeded 2-layer model on the CPU, train.py's optimizers for it, and the stats train_step writes into."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16))
    return model, train_module.build_optimizers(model, "cpu"), train_module.new_stats("cpu")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_train_step_over_micro_batches_equals_one_merged_batch(monkeypatch, optimizer):
    """train.train_step with 4 micro-batches of 2 rows vs 1 of 8: the same mean loss, gradient norm and update."""
    monkeypatch.setattr(train_module, "optimizer", optimizer)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 64, (2, 8, 16), generator=gen)

    def step(micro_steps):
        model, optimizers, stats = tiny_training()
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        train_module.train_step(model, optimizers, scaler, x.view(micro_steps, -1, 16), y.view(micro_steps, -1, 16),
                                stats, train_module.autocast_ctx("cpu", "float32"), 1.0)
        return stats, [p.detach() for p in model.parameters()]

    (merged, weights), (split, split_weights) = step(1), step(4)
    assert split["loss"].item() == pytest.approx(merged["loss"].item(), rel=1e-5)
    assert split["grad_norm"].item() == pytest.approx(merged["grad_norm"].item(), rel=1e-4)
    assert split["bad"].item() == merged["bad"].item() == 0
    for a, b in zip(weights, split_weights):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_float16_overflow_in_one_optimizer_skips_every_optimizer(monkeypatch):
    """float16's GradScaler: an overflow in one Muon matrix's gradient skips the whole step (AdamW's tensors too,
    which GradScaler.step would have stepped on their own finite gradients) and halves the scale."""
    monkeypatch.setattr(train_module, "optimizer", "muon")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 64, (2, 1, 8, 16), generator=gen)
    model, optimizers, stats = tiny_training()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ctx = train_module.autocast_ctx("cpu", "float32")

    def overflow(g):
        g = g.clone()
        g[0, 0] = float("inf")
        return g

    handle = model.layers[0].feed_forward.w1.weight.register_hook(overflow)  # a Muon matrix
    before = [p.detach().clone() for p in model.parameters()]
    train_module.train_step(model, optimizers, scaler, x, y, stats, ctx, 1.0)
    assert stats["bad"].item() == 1 and scaler.get_scale() == 512.0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    handle.remove()
    train_module.train_step(model, optimizers, scaler, x, y, stats, ctx, 1.0)  # a good step moves every tensor
    assert stats["bad"].item() == 0 and scaler.get_scale() == 512.0
    assert not any(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_exact_resume_after_sigkill(data_dir, tmp_path):
    args = dict(max_iters=120, eval_interval=40, log_interval=1, batch_size=16, dropout=0.1)
    straight = tmp_path / "straight"
    train_cli(data_dir, straight, **args)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *settings(data_dir, killed, **args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = killed / "ckpt.pt"
    deadline = time.time() + 240

    def past_the_checkpoint():  # killed well after a checkpoint, so the resume must drop the iterations after it
        if not ckpt.exists() or not (killed / "metrics.jsonl").exists():
            return False
        return any('"iter": 50,' in line for line in open(killed / "metrics.jsonl"))

    while not past_the_checkpoint() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the atomic checkpoint at iteration 40 must do
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed:\n" + out
    assert load_checkpoint(ckpt)["iter_num"] in (40, 80)  # 80 only if this machine was slow to kill
    r = train_cli(data_dir, killed, **args)  # init_from="auto" resumes
    assert "resuming from" in r.stdout

    a, b = load_checkpoint(straight / "ckpt.pt"), load_checkpoint(ckpt)
    assert a["iter_num"] == b["iter_num"] == 120
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    # metrics.jsonl continues from the checkpoint: the killed run's lines after it were dropped
    assert [m["iter"] for m in metrics(killed)] == [m["iter"] for m in metrics(straight)]
    assert [m for m in metrics(straight) if "val_loss" in m][-1] == [m for m in metrics(killed) if "val_loss" in m][-1]


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *settings(data_dir, out, max_iters=100000, log_interval=1,
                                                                    eval_interval=100000)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_metrics(proc, out, 4, timeout=120)  # the eval at 0, then 3 steps
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "SIGTERM received" in output and "Resume with the same command" in output
    assert "Traceback" not in output
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] >= 3


def test_ctrl_c_with_stdout_into_a_pipe_whose_reader_has_gone_still_saves(data_dir, tmp_path):
    """`python train.py 2>&1 | tee log`, then Ctrl-C: the terminal's SIGINT ends tee too, so what train.py prints
    next (its note that it is stopping, a log line, the lines flushed at exit) goes into a pipe nobody reads. It
    still finishes its step, saves and exits 0; what it could not print is dropped."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *settings(data_dir, out, max_iters=100000, log_interval=1,
                                                                    eval_interval=100000)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # a process group of its own, as a terminal's foreground job
    for line in proc.stdout:
        if line.startswith("iter 3/"):
            break
    proc.stdout.close()  # tee is gone
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: to the whole group
    assert proc.wait(timeout=120) == 0
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] >= 3


@pytest.mark.parametrize("error, cause", [
    ('torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.5 GiB free")',
     "CUDA out of memory"),
    ('RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can\'t allocate memory: you '
     'tried to allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)")', "can't allocate memory")])
def test_out_of_memory_is_a_one_line_error_that_names_the_fix(data_dir, tmp_path, error, cause):
    """A batch too large for the memory: train.py as the command line runs it (its __main__), with the forward pass
    failing as CUDA's or the CPU's allocator does after the first checkpoint. One line saying what to change, exit 1,
    and the checkpoint kept (not "lost the other processes", as under torchrun, where both are RuntimeErrors)."""
    out = tmp_path / "run"
    script = tmp_path / "oom.py"
    script.write_text(f"""
import runpy, sys, torch
sys.path.insert(0, {str(ROOT)!r})
import model
forward, calls = model.Transformer.forward, []
def forward_until_oom(self, *args, **kwargs):
    calls.append(1)
    if self.training and len(calls) > 60:
        raise {error}
    return forward(self, *args, **kwargs)
model.Transformer.forward = forward_until_oom
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path({os.path.join(ROOT, "train.py")!r}, run_name="__main__")
""")
    r = run([str(script), *settings(data_dir, out, max_iters=100, eval_interval=10, eval_iters=2)], ROOT)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1] == (
        f"error: out of memory ({cause}); lower --batch_size and raise --gradient_accumulation_steps "
        "by the same factor (the same tokens per iteration), or shorten --max_seq_len (a new model: a new --out_dir). "
        f"{out / 'ckpt.pt'} holds the last checkpoint"), r.stderr
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] >= 10


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=16))
    from model import checkpoint_dict
    path = tmp_path / "ckpt.pt"
    save_checkpoint(checkpoint_dict(model, model.args, iter_num=1), path)

    def crash(obj, f, *a, **k):  # half a file, then the disk is full
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(SystemExit, match=r"^error: could not write .*ckpt.pt \(No space left on device\)"):
        save_checkpoint(checkpoint_dict(model, model.args, iter_num=2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["iter_num"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no .tmp left to keep the disk full


def test_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_previous_one(data_dir, tmp_path):
    out = tmp_path / "run"
    train_cli(data_dir, out, max_iters=2, eval_interval=2)
    before = (out / "ckpt.pt").read_bytes()
    assert len(before) > 100_000
    # torch.save itself hits the limit (its zip writer reports it as "unexpected pos")
    r = subprocess.run([sys.executable, "train.py", *settings(data_dir, out, max_iters=4, eval_interval=2)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limited_file_size(100_000))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    # (best.pt when the evaluation improved: it is written first)
    assert re.match(rf"error: could not write {re.escape(str(out))}/(best|ckpt)\.pt \(File too large\)", last), last
    assert "the previous checkpoint there, if any, is unchanged" in last
    assert (out / "ckpt.pt").read_bytes() == before
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_killed_between_checkpoint_writes_best_pt_holds_the_best_ckpt_pt_claims(data_dir, tmp_path, monkeypatch):
    """An improving evaluation writes best.pt and ckpt.pt; a run killed between the two must not leave ckpt.pt's
    best_val_loss lower than the loss of the model in best.pt."""
    class Killed(BaseException):
        pass
    real_save = train_module.save_checkpoint

    def save_then_die(ckpt, path):
        real_save(ckpt, path)
        if ckpt["iter_num"] == 20:
            raise Killed
    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        in_process_train(data_dir, out, monkeypatch, max_iters=20, eval_interval=10)
    best, ckpt = load_checkpoint(out / "best.pt"), load_checkpoint(out / "ckpt.pt")
    assert best["iter_num"] == 20 and ckpt["iter_num"] == 10  # the loss improved at 20: best.pt was written first
    assert best["best_val_loss"] <= ckpt["best_val_loss"]


def in_process_train(data_dir, out_dir, monkeypatch, **extra):
    """Run train.train() in this process (so a test can patch the model), with settings applied as the CLI does."""
    g = vars(train_module)
    saved = {k: g[k] for k in train_module.settings_of(g)}
    try:
        configure(g, settings(data_dir, out_dir, **extra))
        train_module.train()
    finally:
        g.update(saved)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def poison_forward(monkeypatch, bad_calls):
    """Make the loss NaN on the given forward calls (counted from 1, training and eval alike)."""
    calls = {"n": 0}
    original = Transformer.forward

    def forward(self, tokens, targets=None, **kw):
        logits = original(self, tokens, targets, **kw)
        if targets is not None and torch.is_grad_enabled():
            calls["n"] += 1
            if bad_calls(calls["n"]):
                self.last_loss = self.last_loss * float("nan")
        return logits

    monkeypatch.setattr(Transformer, "forward", forward)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_nan_steps_are_skipped_and_counted(data_dir, tmp_path, monkeypatch, optimizer):
    out = tmp_path / "run"
    # micro-batches 21..26 are iterations 11, 12, 13 (2 micro-steps each)
    poison_forward(monkeypatch, lambda n: 21 <= n <= 26)
    in_process_train(data_dir, out, monkeypatch, max_iters=20, eval_interval=20, log_interval=1,
                     optimizer=optimizer)
    logs = {m["iter"]: m for m in metrics(out) if "loss" in m}
    assert all(math.isnan(logs[i]["loss"]) for i in (11, 12, 13))
    assert logs[10]["skipped"] == 0 and logs[13]["skipped"] == 3 and logs[20]["skipped"] == 3
    assert math.isfinite(logs[20]["loss"])
    assert all(torch.isfinite(t).all() for t in load_checkpoint(out / "ckpt.pt")["model"].values())


@pytest.mark.parametrize("eval_interval", [10, 100])
def test_persistent_nan_stops_with_the_last_checkpoint_intact(data_dir, tmp_path, monkeypatch, eval_interval):
    out = tmp_path / "run"
    poison_forward(monkeypatch, lambda n: n > 2 * 10)  # every step after iteration 10
    # log_interval far above max_bad_steps: the count is still checked in time (every step on the CPU)
    with pytest.raises(SystemExit, match="consecutive steps with a non-finite loss") as e:
        in_process_train(data_dir, out, monkeypatch, max_iters=100, eval_interval=eval_interval, log_interval=50,
                         max_bad_steps=5)
    assert "5 consecutive steps with a non-finite loss or gradient at iteration 15" in str(e.value)
    if eval_interval == 100:  # nothing saved yet, and the message says so
        assert "no checkpoint was written" in str(e.value) and not (out / "ckpt.pt").exists()
        return
    assert f"{out / 'ckpt.pt'} holds iteration 10" in str(e.value)
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 10
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_mismatched_resume_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    train_cli(data_dir, out, max_iters=5, eval_interval=5)
    before = (out / "ckpt.pt").read_bytes()
    r = run(["train.py", *settings(data_dir, out, max_iters=10, dim=64)], ROOT)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "another model shape (dim: checkpoint 32 vs config 64" in r.stderr
    # the safe choice (another --out_dir) comes first; --init_from=scratch says it keeps this run
    assert r.stderr.index("another --out_dir") < r.stderr.index("--init_from=scratch") < r.stderr.index("moves")
    assert (out / "ckpt.pt").read_bytes() == before


def test_bad_settings_are_one_line_errors(data_dir, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, as where it is not installed
    # setting errors: exit code 2 (as the configurator's), before data preparation or any file is written (data_dir
    # holds no data, so a check made only after data preparation fails with another message)
    cases = [
        (dict(device="cuda"), "no CUDA GPU") if not torch.cuda.is_available() else (dict(device="tpu"), "device"),
        (dict(device="cpu:x"), "unknown device 'cpu:x'"),
        (dict(optimizer="sgd"), "choose adamw or muon"),
        (dict(compile=1), "--compile must be True, False or None"),
        (dict(eval_interval=0), "--eval_interval must be >= 1"),
        (dict(lr_schedule="linear"), "choose cosine, wsd or constant"),
        (dict(dim=130), "dim (130) must be divisible by n_heads (4)"),
        (dict(n_kv_heads=3), "n_heads (4) must be divisible by n_kv_heads (3)"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
        (dict(seed=-1), "--seed must be >= 0"),
        (dict(beta2=1.5), "--beta2 must be in [0, 1), not 1.5"),
        (dict(beta1=-0.1), "--beta1 must be in [0, 1), not -0.1"),
        (dict(weight_decay=-0.1), "--weight_decay must be >= 0 (0: off), not -0.1"),
        (dict(grad_clip=-1.0), "--grad_clip must be >= 0 (0: off), not -1.0"),
        (dict(wandb_log=True), "pip install wandb"),
        (dict(out_dir=""), "--out_dir is empty"),
        (dict(out_dir=a_file), "exists and is not a directory"),
        (dict(out_dir=a_file / "sub"), "cannot write to --out_dir"),
        (dict(out_dir="/proc/x"), "cannot write to --out_dir"),
    ]
    for extra, message in cases:
        extra = dict(extra)
        out = extra.pop("out_dir", tmp_path / "x")
        with pytest.raises(SystemExit) as e:
            in_process_train(tmp_path / "no_data", out, monkeypatch, **extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, (extra, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"], extra  # nothing prepared or created
    assert a_file.read_text() == "keep me"
    # the same through the command line: one line, exit code 2, where a shape error was a late traceback
    for extra, message in [(dict(dim=130), "invalid model shape"), (dict(seed=-1), "--seed must be >= 0")]:
        r = run(["train.py", *settings(tmp_path / "no_data", tmp_path / "x", **extra)], ROOT)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (extra, r.stderr)
        assert not (tmp_path / "x").exists()
    # errors found in files: exit code 1
    for extra, message in [(dict(init_from="resume"), "does not exist"),
                           (dict(vocab_size=512), "train_vocab --vocab_size=512")]:
        r = run(["train.py", *settings(data_dir, tmp_path / "x", **extra)], ROOT)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
    # random bytes are not "pickled Python objects"
    (tmp_path / "x").mkdir(exist_ok=True)
    (tmp_path / "x" / "ckpt.pt").write_bytes(random.Random(0).randbytes(5000))
    r = run(["train.py", *settings(data_dir, tmp_path / "x")], ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "is truncated or not a PyTorch checkpoint" in r.stderr and "pickled" not in r.stderr


def test_fresh_start_keeps_the_earlier_run(data_dir, tmp_path):
    out = tmp_path / "run"
    train_cli(data_dir, out, max_iters=4, eval_interval=2)
    old = {name: (out / name).read_bytes() for name in ("ckpt.pt", "best.pt", "metrics.jsonl")}
    # a refused start moves nothing
    r = run(["train.py", *settings(data_dir, out, init_from="scratch", dim=130)], ROOT)
    assert r.returncode == 2 and {n: (out / n).read_bytes() for n in old} == old
    # init_from="auto" with a ckpt.pt still resumes; asked for more than it has, it says so
    r = train_cli(data_dir, out, max_iters=3, eval_interval=2)
    assert "resuming from" in r.stdout and "already at iteration 4 and max_iters is 3: nothing to train" in r.stderr
    assert {n: (out / n).read_bytes() for n in old} == old
    r = train_cli(data_dir, out, init_from="scratch", max_iters=2, eval_interval=2)
    kept = glob.glob(str(out / "run-*"))
    assert len(kept) == 1 and f"was moved to {kept[0]}/" in r.stdout
    assert {n: open(os.path.join(kept[0], n), "rb").read() for n in old} == old  # nothing of it lost
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 2 and [m["iter"] for m in metrics(out)][-1] == 2
    assert [m["iter"] for m in metrics(out)][0] == 0  # the new run's metrics start afresh


def test_eval_only_evaluates_the_checkpoint_and_writes_nothing(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train_cli(data_dir, out, max_iters=4, eval_interval=2)

    def files():
        return {p.name: p.read_bytes() for p in out.iterdir()}
    before = files()
    r = train_cli(data_dir, out, eval_only=True)  # the checkpoint's losses; metrics.jsonl gets no record of them
    assert re.search(r"^iter 4: train loss [0-9.]+, val loss [0-9.]+, val [0-9.]+ bits/byte$", r.stdout, re.M)
    assert files() == before
    # no checkpoint: a one-line error, where a random model's loss was reported and the earlier run moved aside
    (out / "ckpt.pt").rename(tmp_path / "ckpt.pt")
    before = files()
    for where, extra in ((out, {}), (tmp_path / "typo", {}), (out, dict(init_from="resume"))):
        with pytest.raises(SystemExit) as e:
            in_process_train(data_dir, where, monkeypatch, eval_only=True, **extra)
        assert e.value.code == f"error: --eval_only=True evaluates {where / 'ckpt.pt'}, which does not exist; " \
                               "point --out_dir at the folder of a trained run"
    assert "val loss" not in capsys.readouterr().out
    assert files() == before and not (tmp_path / "typo").exists()
    with pytest.raises(SystemExit) as e:
        in_process_train(data_dir, out, monkeypatch, eval_only=True, init_from="scratch")
    assert e.value.code == 2 and "drop --init_from=scratch" in capsys.readouterr().err and files() == before
    # settings of another shape: evaluate with the run's own (not --init_from=scratch, which eval_only refuses)
    (tmp_path / "ckpt.pt").rename(out / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        in_process_train(data_dir, out, monkeypatch, eval_only=True, dim=48)
    assert "(dim: checkpoint 32 vs config 48" in e.value.code
    assert e.value.code.endswith("); evaluate it with the settings it was trained with"), e.value.code


def test_second_run_on_a_busy_out_dir_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "train.py", *settings(data_dir, out, max_iters=100000,
                                                                      eval_interval=100000, log_interval=1)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_metrics(holder, out, 3, timeout=120)
        assert holder.poll() is None, holder.communicate()[0]
        r = run(["train.py", *settings(data_dir, out, max_iters=5)], ROOT)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        line = r.stderr.strip().splitlines()[-1]
        assert f"is in use by pid {holder.pid} on " in line and "train.py" in line and "another --out_dir" in line
        assert len(metrics(out)) >= 3  # the running run's metrics were not touched
    finally:
        holder.send_signal(signal.SIGKILL)  # its lock goes with it: nothing is left stuck
        holder.communicate()
    r = train_cli(data_dir, out, max_iters=2, eval_interval=2)
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 2


def test_no_file_locking_degrades_to_a_warning(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # neither POSIX nor Windows locks importable
    monkeypatch.setitem(sys.modules, "msvcrt", None)
    in_process_train(data_dir, tmp_path / "run", monkeypatch, max_iters=0)
    assert "warning: cannot lock" in capsys.readouterr().err
    assert metrics(tmp_path / "run")[0]["iter"] == 0


def test_eval_iters_beyond_the_val_split_is_noted(data_dir, tmp_path):
    # 4 x 32 = 128 windows of 33 tokens: more than the val split's 99, far fewer than the train split's
    r = train_cli(data_dir, tmp_path / "run", max_iters=0, eval_iters=4, batch_size=32)
    assert "= 128 windows of 33 tokens, but the val split holds only 99" in r.stderr and "--eval_iters=3" in r.stderr
    assert "the train split" not in r.stderr


def test_missing_data_names_the_commands_for_its_source(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "data_dir", str(tmp_path))
    monkeypatch.setattr(train_module, "vocab_size", 512)
    for source, fragment in (("tinystories", "`python preprocess.py download tinystories`, then `python preprocess.py "
                                             "train_vocab --vocab_size=512 --input data/raw/tinystories"),
                             ("mine", "make it with `python preprocess.py train_vocab --vocab_size=512 --input "
                                      "YOUR_TEXT_FILES")):
        monkeypatch.setattr(train_module, "data_source", source)
        with pytest.raises(SystemExit, match="error: no tokenized data in") as e:
            train_module.ensure_data(master=True)
        assert fragment in str(e.value)
    assert os.listdir(tmp_path) == []  # only "shakespeare" is prepared automatically


def test_mismatched_shards_error_names_the_command_that_fixes_them(tmp_path):
    rng = random.Random(2)
    for name, words in (("a", WORDS), ("b", [w[::-1] + "x" for w in WORDS])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "text.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(80))
                                                              for _ in range(200)) + "\n")
    data = tmp_path / "data"
    for verb, where in ((["train_vocab", f"--input={tmp_path / 'a'}"], data),
                        (["pretokenize", f"--input={tmp_path / 'a'}", "--val_fraction=0.1"], data),
                        (["train_vocab", f"--input={tmp_path / 'b'}"], tmp_path / "other")):
        r = run(["preprocess.py", *verb, f"--vocab_size={VOCAB}", f"--data_dir={where}"], ROOT)
        assert r.returncode == 0, r.stderr
    # the tokenizer is replaced behind the shards' back
    (data / f"tok{VOCAB}.model").write_bytes((tmp_path / "other" / f"tok{VOCAB}.model").read_bytes())
    r = run(["train.py", *settings(str(data), tmp_path / "out", max_iters=0)], ROOT)
    assert r.returncode != 0 and "made with another tokenizer" in r.stderr and "Traceback" not in r.stderr
    command = r.stderr.split("`")[1]
    assert f"--input {tmp_path / 'a'}" in command
    words = shlex.split(command)
    assert words[:2] == ["python", "preprocess.py"]
    assert run(words[1:], ROOT).returncode == 0  # the command it names fixes it
    train_cli(str(data), tmp_path / "out", max_iters=0)


def test_resume_takes_new_hyperparameters_but_refuses_another_optimizer(data_dir, tmp_path):
    out = tmp_path / "run"
    common = dict(lr_schedule="constant", warmup_iters=0, eval_interval=10)
    train_cli(data_dir, out, learning_rate=3e-3, max_iters=10, **common)
    train_cli(data_dir, out, learning_rate=1e-3, weight_decay=0.5, max_iters=20, **common)
    groups = load_checkpoint(out / "ckpt.pt")["optimizer"][0]["param_groups"]
    assert [g["lr"] for g in groups] == [pytest.approx(1e-3)] * 2  # the new peak, not the checkpoint's
    assert groups[0]["weight_decay"] == 0.5
    r = run(["train.py", *settings(data_dir, out, optimizer="muon", max_iters=30, **common)], ROOT)
    assert r.returncode != 0 and "holds the state of another optimizer" in r.stderr and "Traceback" not in r.stderr


def test_resume_takes_another_dropout(data_dir, tmp_path, monkeypatch):
    """dropout is a regulariser, not a shape: a resumed run may change it (as nanoGPT's may), trains with the new
    value and records it."""
    first = tmp_path / "first"
    in_process_train(data_dir, first, monkeypatch, max_iters=10, eval_interval=10, dropout=0.0)
    weights = {}
    for p in (0.0, 0.3):
        out = tmp_path / f"dropout{p}"
        shutil.copytree(first, out)
        in_process_train(data_dir, out, monkeypatch, max_iters=20, eval_interval=10, dropout=p)
        ckpt = load_checkpoint(out / "ckpt.pt")
        assert ckpt["iter_num"] == 20 and ckpt["model_args"]["dropout"] == p
        weights[p] = ckpt["model"]
    assert any(not torch.equal(t, weights[0.3][k]) for k, t in weights[0.0].items())  # 0.3 took effect


def test_tokens_count_on_across_a_resume_with_another_batch_size(data_dir, tmp_path, monkeypatch):
    """metrics.jsonl's tokens after a resume with twice the batch: 40 x 256 tokens, then 512 per iteration. A
    checkpoint without the count (older ones) counts its iterations at its config's tokens per iteration."""
    out = tmp_path / "run"
    in_process_train(data_dir, out, monkeypatch, max_iters=40, eval_interval=40)
    old = tmp_path / "old"  # the same checkpoint without the count, as earlier versions wrote it
    shutil.copytree(out, old)
    ckpt = load_checkpoint(old / "ckpt.pt")
    ckpt.pop("tokens", None)
    save_checkpoint(ckpt, old / "ckpt.pt")
    for run_dir in (out, old):
        in_process_train(data_dir, run_dir, monkeypatch, max_iters=50, eval_interval=10, batch_size=8)
        tokens = {m["iter"]: m["tokens"] for m in metrics(run_dir)}
        assert tokens[40] == 40 * 256 and tokens[45] == 40 * 256 + 5 * 512 and tokens[50] == 40 * 256 + 10 * 512
        assert load_checkpoint(run_dir / "ckpt.pt")["tokens"] == 40 * 256 + 10 * 512


def test_resume_refuses_another_tokenizer(data_dir, tmp_path):
    out = tmp_path / "run"
    train_cli(data_dir, out, max_iters=5, eval_interval=5)
    other = tmp_path / "other"
    (other / "raw").mkdir(parents=True)
    rng = random.Random(1)  # other words than the fixture's corpus: another tokenizer of the same size
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    (other / "raw" / "other.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60))
                                                           for _ in range(300)) + "\n")
    for verb in (["train_vocab"], ["pretokenize", "--val_fraction=0.1"]):
        r = run(["preprocess.py", *verb, f"--vocab_size={VOCAB}", f"--input={other / 'raw'}",
                 f"--data_dir={other / 'data'}"], ROOT)
        assert r.returncode == 0, r.stderr
    r = run(["train.py", *settings(str(other / "data"), out, max_iters=10)], ROOT)
    assert r.returncode != 0 and "trained with another tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_muon_trains(data_dir, tmp_path):
    out = tmp_path / "run"
    train_cli(data_dir, out, optimizer="muon", muon_lr=0.02, max_iters=40, eval_interval=40)
    evals = [m for m in metrics(out) if "val_loss" in m]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0


def test_torchrun_two_processes_match_one(data_dir, tmp_path):
    # float32: "auto" takes bfloat16 on CPUs that multiply it fast, whose rounding would hide a real mismatch
    common = dict(max_iters=40, eval_interval=40, gradient_accumulation_steps=2, batch_size=8, dtype="float32")
    single = tmp_path / "single"
    train_cli(data_dir, single, **common)
    double = tmp_path / "double"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *settings(data_dir, double, **common)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 process(es)" in r.stdout and "gradients summed over 2 processes in" in r.stdout
    # the two ranks' micro-batches hold the windows of the one process's two (the batch stream deals them out in
    # turn), and every rank starts from rank 0's weights: the same global batch, so the same steps. Each logged
    # loss is the mean over both processes, as the one process logs it
    logged = [[(m["loss"], m["grad_norm"]) for m in metrics(d) if "loss" in m] for d in (single, double)]
    assert len(logged[0]) == len(logged[1]) == 8
    for (loss1, norm1), (loss2, norm2) in zip(*logged):
        assert loss2 == pytest.approx(loss1, rel=1e-5) and norm2 == pytest.approx(norm1, rel=1e-5)
    one = [m for m in metrics(single) if "val_loss" in m][-1]["val_loss"]
    two = [m for m in metrics(double) if "val_loss" in m][-1]["val_loss"]
    assert abs(one - two) / one < 0.05  # evaluation: each rank reads its own share of the val windows
    # the single-process run resumed by two processes: each continues from rank 0's place in the data
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *settings(data_dir, single, **{**common, "max_iters": 50})],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stdout and "world size changed 1 -> 2" in r.stderr
    assert load_checkpoint(single / "ckpt.pt")["iter_num"] == 50
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
             *settings(data_dir, tmp_path / "odd", gradient_accumulation_steps=3)], ROOT)
    assert r.returncode != 0 and "must be divisible by the number of processes" in r.stderr


def test_grad_buffer_sums_each_bucket_while_the_backward_pass_runs(monkeypatch):
    """GradBuffer starts each bucket's all_reduce once the last micro-batch's backward has filled it, in bucket
    order, once per step, before the backward pass reaches the embedding; and the step equals one without it
    (one process: the sums change nothing, so bitwise)."""
    import torch._dynamo  # noqa: F401  (before the group: see train.py's import under ddp)
    import torch.distributed as dist
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 64, (2, 2, 2, 4, 16), generator=gen)  # 2 steps of 2 micro-batches
    events, at_start = [], []
    all_reduce = dist.all_reduce

    def spy(t, **kw):  # one process: the sum changes nothing, so a bucket must be complete when it starts
        events.append(t.data_ptr())
        at_start.append(t.clone())
        return all_reduce(t, **kw)
    monkeypatch.setattr(dist, "all_reduce", spy)
    monkeypatch.setattr(train_module.GradBuffer, "bucket_bytes", 8192)

    def step(buffered):
        model, optimizers, stats = tiny_training()
        grads = train_module.GradBuffer(model.parameters(), 1) if buffered else None
        def note_embedding(module, inputs, out):  # when the backward pass reaches the embedding
            out.register_hook(lambda g: events.append("embedding"))
        model.tok_embeddings.register_forward_hook(note_embedding)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for i in range(2):
            events.clear()
            at_start.clear()
            train_module.train_step(model, optimizers, scaler, x[i], y[i], stats,
                                    train_module.autocast_ctx("cpu", "float32"), 1.0, grads)
        return stats, [p.detach().clone() for p in model.parameters()], grads

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plain, plain_weights, _ = step(False)
        summed, weights, grads = step(True)
    finally:
        dist.destroy_process_group()
    buckets = [b.data_ptr() for b in grads.buckets]
    assert len(buckets) > 2
    # the second micro-batch's backward: the embedding's input gradient comes once per micro-batch, the buckets
    # (the embedding's own, which the LM head shares, last) once per step, all but the last before it
    assert [e for e in events if e != "embedding"] == buckets
    assert events.index("embedding", 1) > events.index(buckets[-2])
    assert all(torch.equal(started, bucket) for started, bucket in zip(at_start, grads.buckets))
    for k in plain:
        assert torch.equal(plain[k], summed[k]), k
    for a, b in zip(plain_weights, weights):
        assert torch.equal(a, b)


def test_two_processes_sum_many_buckets_as_one(tmp_path):
    """GradBuffer across 2 gloo processes: gradients in many small buckets, each started during the backward pass,
    take the same steps, bitwise, as in one bucket started after it (a sum of two numbers has one order)."""
    script = tmp_path / "buckets.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import torch, torch._dynamo, torch.distributed as dist
import train
from model import ModelArgs, Transformer
dist.init_process_group("gloo")
rank = dist.get_rank()
gen = torch.Generator().manual_seed(0)
x, y = torch.randint(0, 64, (2, 2, 3, 2, 4, 16), generator=gen)  # per process, 3 steps of 2 micro-batches
weights = {{}}
for bucket_bytes in (4096, 2 ** 30):
    train.GradBuffer.bucket_bytes = bucket_bytes
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16))
    optimizers = train.build_optimizers(model, "cpu")
    grads = train.GradBuffer(model.parameters(), 2)
    stats = train.new_stats("cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for i in range(3):
        train.train_step(model, optimizers, scaler, x[rank, i], y[rank, i], stats,
                         train.autocast_ctx("cpu", "float32"), 1.0, grads)
    weights[bucket_bytes] = ([p.detach().clone() for p in model.parameters()], len(grads.buckets))
(many, n), (one, m) = weights[4096], weights[2 ** 30]
assert n > 4 and m == 1, (n, m)
assert all(torch.equal(a, b) for a, b in zip(many, one))
print(f"rank {{rank}}: {{n}} buckets = 1 bucket")
dist.destroy_process_group()
""")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rank 0:" in r.stdout and "rank 1:" in r.stdout and "buckets = 1 bucket" in r.stdout


@pytest.mark.parametrize("device", ["cpu", "cpu:0"])
def test_torchrun_processes_take_rank_0s_bf16_verdict(tmp_path, device):
    """Under torchrun on a CPU, whether bfloat16 is fast (dtype="auto"'s training dtype, Muon's Newton-Schulz
    precision) is rank 0's measurement for every process: here the two ranks' measurements disagree (as they may
    near the threshold), and after start_processes both take rank 0's, rank 1 without measuring. (--device=cpu:0
    is a CPU too.)"""
    script = tmp_path / "verdict.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import torch, torch.distributed as dist
import model, train
rank = int(os.environ["RANK"])
measured = []
def measurement():  # bfloat16 wins on rank 0, loses on rank 1
    measured.append(rank)
    return rank == 0
model._cpu_bf16_matmul_wins = measurement
torch.cpu._is_avx512_bf16_supported = lambda: True  # (so that the measurement decides, on any CPU)
train.device, train.gradient_accumulation_steps = {device!r}, 2
train.start_processes()
muon = model.Muon([torch.nn.Parameter(torch.ones(4, 4))])
muon.param_groups[0]["params"][0].grad = torch.ones(4, 4)
muon.step()
with open(f"rank{{rank}}.txt", "w") as f:  # (rank 1's stdout is /dev/null)
    f.write(f"{{model.fast_bf16_matmul('cpu')}} {{model.pick_dtype('auto', 'cpu', training=True)}} "
            f"{{muon.param_groups[0]['ns_dtype']}} measured {{len(measured)}}")
dist.destroy_process_group()
""")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "rank0.txt").read_text() == "True bfloat16 bfloat16 measured 1"
    assert (tmp_path / "rank1.txt").read_text() == "True bfloat16 bfloat16 measured 0"


def test_torchrun_frees_the_process_group_before_python_exits(data_dir, tmp_path):
    """train.py under torchrun, as its __main__ runs, with destroy_process_group watched: once train() returns,
    nothing may hold the process group. A group that outlives it keeps gloo's threads running into Python's
    shutdown, where freeing a finished collective's tensors aborts the process (exit code -6, after a run that
    trained to the end, in about 1 of 20 runs); module-level defaults that captured dist.group.WORLD did that."""
    script = tmp_path / "watch.py"
    script.write_text(f"""import gc, runpy, sys, weakref
import torch.distributed as dist
groups = []
destroy = dist.destroy_process_group
def watched(*args, **kwargs):
    groups.append(weakref.ref(dist.distributed_c10d._get_default_group()))
    destroy(*args, **kwargs)
dist.destroy_process_group = watched
sys.path.insert(0, {ROOT!r})
runpy.run_path({os.path.join(ROOT, "train.py")!r}, run_name="__main__")
gc.collect()
print("process group destroyed:", len(groups), "still held:", sum(g() is not None for g in groups), flush=True)
""")
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
             *settings(data_dir, tmp_path / "out", max_iters=4, eval_interval=4, eval_iters=1)], ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    # (rank 0's line: the other rank's stdout goes to /dev/null)
    assert "process group destroyed: 1 still held: 0" in r.stdout, r.stdout + r.stderr


def worker_pids(launcher_pid):
    """{rank: pid} of torchrun's workers (its children that have RANK in their environment)."""
    pids = {}
    for child in subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split():
        try:
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{child}/environ").read().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            pids[int(env["RANK"])] = int(child)
    return pids


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="finds torchrun's workers through /proc")
def test_a_dead_rank_ends_the_job_with_a_message(data_dir, tmp_path):
    out = tmp_path / "ddp"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "train.py", *settings(data_dir, out, max_iters=100000, eval_interval=10,
                                                       log_interval=1, ddp_timeout=20)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and launcher.poll() is None and not (out / "ckpt.pt").exists():
        time.sleep(0.1)
    pids = worker_pids(launcher.pid)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGKILL)
    t_kill = time.time()
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode != 0 and time.time() - t_kill < 60, output
    assert "error: rank 0: lost the other processes" in output and "holds the last checkpoint" in output, output
    assert "Traceback" not in output.split("error: rank 0")[0][-2000:]  # the survivor's own message, not a trace
    ckpt = load_checkpoint(out / "ckpt.pt")  # still whole
    assert ckpt["iter_num"] >= 10 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_a_log_iteration_and_the_resume_is_exact(data_dir, tmp_path):
    """Run again, the stopped run continues bitwise as one that never stopped: each rank from its own place in the
    data, with its own random generators (dropout: each rank draws its own masks)."""
    # a constant learning rate: the stopped run's max_iters does not shape the schedule; float32: not dtype="auto"'s
    # measurement, which could choose another dtype for the straight run
    common = dict(eval_interval=100000, log_interval=5, dropout=0.1, lr_schedule="constant", dtype="float32")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    out = tmp_path / "ddp"
    launcher = subprocess.Popen([sys.executable, *torchrun, *settings(data_dir, out, max_iters=100000, **common)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_metrics(launcher, out, 3, timeout=240)  # the eval at 0, then 2 logs
    pids = worker_pids(launcher.pid)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGTERM)  # only rank 1 is told: rank 0 hears of it at the next log iteration
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 0, output
    stops = [int(w) for w in re.findall(r"stopped at iteration (\d+)", output)]
    assert len(stops) == 1 and stops[0] % 5 == 0, output  # printed once (rank 0), at a log iteration
    assert "done:" not in output and "next: python sample.py" not in output, output  # rank 0 stopped, too
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == stops[0] and len(ckpt["data_state"]["ranks"]) == 2

    straight = tmp_path / "straight"
    for d in (out, straight):  # resumed (init_from="auto"), and the same iterations without a stop
        r = run([*torchrun, *settings(data_dir, d, max_iters=stops[0] + 10, **common)], ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
    a, b = load_checkpoint(straight / "ckpt.pt"), load_checkpoint(out / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == stops[0] + 10
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_restore_gives_each_rank_its_own_random_generators_and_reads_older_checkpoints():
    """Under the checkpoint's number of processes each rank resumes its own random generators (its dropout
    masks); under another number, or from an older checkpoint (a single state: rank 0's), each keeps its own seed
    (seed + rank): no continuation is exact then, and rank 0's state would give every rank the same masks."""
    def saved(world_size):  # the generators of world_size processes, each in a state of its own
        states = []
        for rank in range(world_size):
            torch.manual_seed(100 + rank)
            states.append(train_module.rng_state())
        return states

    def resumed(rng, saved_world_size, rank, world_size):  # this process's torch generator after restore()
        torch.manual_seed(7)  # as train() seeds it before resuming
        ckpt = {"optimizer": [], "scaler": None, "iter_num": 10, "best_val_loss": 1.0, "rng": rng,
                "data_state": {"world_size": saved_world_size, "ranks": [None] * saved_world_size}}
        train_module.restore(ckpt, "ckpt.pt", [], None, train_module.Processes(world_size > 1, rank, world_size, "cpu"))
        return torch.get_rng_state()

    own = torch.manual_seed(7).get_state()
    two, one = saved(2), saved(1)
    assert torch.equal(resumed(two, 2, rank=1, world_size=2), two[1]["torch"])
    assert torch.equal(resumed(one, 1, rank=0, world_size=1), one[0]["torch"])
    assert torch.equal(resumed(two, 2, rank=0, world_size=1), own)  # another number of processes
    assert torch.equal(resumed(one, 1, rank=1, world_size=2), own)
    assert torch.equal(resumed(one[0], 1, rank=0, world_size=1), one[0]["torch"])  # older checkpoints
    assert torch.equal(resumed(two[0], 2, rank=1, world_size=2), own)


def test_configs_parse():
    names = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
    assert {"tiny.py", "shakespeare.py", "stories15M.py", "stories42M.py", "stories110M.py"} <= set(names)
    for name in names:
        g = {k: getattr(train_module, k) for k in train_module.settings_of(vars(train_module))}
        configure(g, [os.path.join(ROOT, "configs", name)])
        args = ModelArgs(dim=g["dim"], n_layers=g["n_layers"], n_heads=g["n_heads"], n_kv_heads=g["n_kv_heads"],
                         vocab_size=g["vocab_size"], multiple_of=g["multiple_of"], max_seq_len=g["max_seq_len"])
        assert args.hidden_dim > 0
        assert g["gradient_accumulation_steps"] >= 1 and g["max_iters"] > g["warmup_iters"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_results_are_read_once_the_next_step_is_launched():
    """Results, deferred as on CUDA: a copy taken after a step is handed out only once another step has been
    launched (or when the loop flushes before an evaluation or the end), and it holds that step's values."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=64, max_seq_len=8))
    optimizers = train_module.build_optimizers(model, "cpu")
    stepper = train_module.Stepper(model, optimizers, torch.amp.GradScaler("cpu", enabled=False), 1, 2, 8, "cpu",
                                   train_module.autocast_ctx("cpu", "float32"), 1.0, None, False)
    results = train_module.Results(stepper, deferred=True, ddp=False, timeout=10)
    gen = torch.Generator().manual_seed(0)

    def step():
        batch = torch.randint(0, 64, (2, 9), generator=gen)
        stepper.load([batch[:, :-1]], [batch[:, 1:]])
        stepper()
        return stepper.stats["loss"].item()

    first = step()
    results.take(1, True, 1e-3, False)
    assert results.ready(everything=False) == []  # no step launched after it: the device may still be on it
    second = step()
    assert second != first
    [(it, logged, r, stop)] = results.ready(everything=False)
    assert (it, logged, stop) == (1, True, False) and r["loss"] == first and r["bad_steps"] == 0 and r["lr"] == 1e-3
    results.take(2, False, 1e-3, False)
    assert results.ready(everything=False) == []
    [(it, logged, r, _)] = results.ready(everything=True)  # before an evaluation, a stop or the end
    assert (it, logged) == (2, False) and r["loss"] == second
    assert results.ready(everything=True) == []


@needs_cuda
@pytest.mark.parametrize("dtype,optimizer", [("float32", "adamw"), ("float32", "muon"), ("float16", "adamw"),
                                             ("float16", "muon")])
def test_captured_step_matches_the_plain_step(monkeypatch, dtype, optimizer):
    """train.py's Stepper captured in a CUDA graph vs run eagerly: same losses and weights step by step, through a
    changing lr, an evaluation, a batch of another shape, and a skipped non-finite step (in float16, skipped by
    the GradScaler, which halves its scale, on the device)."""
    for k, v in dict(warmup_iters=4, learning_rate=3e-3, max_iters=20, min_lr=3e-4, optimizer=optimizer).items():
        monkeypatch.setattr(train_module, k, v)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 128, (4, 33), generator=gen) for _ in range(40)]
    evalx = torch.randint(0, 128, (3, 33), generator=gen).cuda()

    def run(capture):
        torch.manual_seed(0)
        model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                                      max_seq_len=32)).cuda()
        optimizers = train_module.build_optimizers(model, "cuda")
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
        step = train_module.Stepper(model, optimizers, scaler, 2, 4, 32, "cuda", train_module.autocast_ctx(
            "cuda", dtype, cache=not capture), 1.0, None, capture)
        losses, evals, skipped = [], [], []
        batches = iter(data)
        for it in range(12):
            train_module.set_lr(optimizers, it)  # warmup: a new lr every step
            rows = 2 if it == 8 else 4  # iteration 8: micro-batches of another shape
            pair = [next(batches)[:rows] for _ in range(2)]
            step.load([b[:, :-1] for b in pair], [b[:, 1:] for b in pair])
            poisoned = model.layers[0].feed_forward.w1.weight
            if it == 6:  # a non-finite step (captured by now): skipped on the device, the weights stay
                before = [p.detach().clone() for p in model.parameters()]
                saved = poisoned.data[0, 0].item()
                poisoned.data[0, 0] = float("inf")
            step()
            if it == 6:
                poisoned.data[0, 0] = saved
                assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            losses.append(step.stats["loss"].item())
            skipped.append(int(step.stats["skipped"].item()))
            if it == 5:  # evaluation between steps, on the model outside the graph
                model.eval()
                with torch.no_grad():
                    model(evalx[:, :-1], evalx[:, 1:], return_logits=False)
                evals.append(model.last_loss.item())
                model.train()
        assert (step.graph is not None) == capture
        return losses, evals, skipped, [p.detach().clone() for p in model.parameters()], scaler.get_scale()

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # full float32 matmuls: the two paths differ only by capture
    try:
        plain, captured = run(False), run(True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert not math.isfinite(plain[0][6]) and not math.isfinite(captured[0][6])
    assert plain[2] == captured[2] == [0] * 6 + [1] * 6
    finite = [i for i in range(12) if i != 6]
    assert [captured[0][i] for i in finite] == pytest.approx([plain[0][i] for i in finite], rel=1e-4)
    assert captured[1] == pytest.approx(plain[1], rel=1e-4)
    for a, b in zip(plain[3], captured[3]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    # float16: the scaler's one overflow (step 6) halved its scale; it grows only after 2000 good steps
    assert plain[4] == captured[4] == (2.0 ** 15 if dtype == "float16" else 1.0)


@needs_cuda
@pytest.mark.parametrize("dtype,optimizer", [("bfloat16", "adamw"), ("float16", "adamw"), ("bfloat16", "muon")])
def test_cuda_training_end_to_end(data_dir, tmp_path, dtype, optimizer):
    out = tmp_path / "run"  # compiled (each block once) and captured
    common = dict(device="cuda", dtype=dtype, optimizer=optimizer, eval_interval=15, log_interval=5, compile=True)
    r = train_cli(data_dir, out, max_iters=30, **common)
    assert "step: one CUDA graph" in r.stdout, r.stdout
    assert "2 micro-batches of 4 merged into 1 of 8" in r.stdout and "first step done" in r.stdout
    evals = [m for m in metrics(out) if "val_loss" in m]
    assert [m["iter"] for m in evals] == [0, 15, 30] and evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    # each log iteration is read one step late (the next step runs meanwhile), yet logged once, in order, and
    # before the evaluation at the same iteration
    assert [(m["iter"], "val_loss" in m) for m in metrics(out)] == [
        (0, True), (5, False), (10, False), (15, False), (15, True), (20, False), (25, False), (30, False), (30, True)]
    r = train_cli(data_dir, out, max_iters=45, **common)  # resumes into a new graph
    assert "resuming from" in r.stdout and load_checkpoint(out / "ckpt.pt")["iter_num"] == 45
    assert all(math.isfinite(m["loss"]) for m in metrics(out) if "loss" in m)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_torchrun_two_gpus_capture_the_step_and_match_one(data_dir, tmp_path):
    """Under torchrun on 2 GPUs the step, all_reduce included, is one CUDA graph, and it takes the steps one GPU
    takes at the same global batch (float32; TF32 matmuls of other shapes: not bitwise)."""
    common = dict(device="cuda", dtype="float32", compile=False, max_iters=10, eval_interval=10, log_interval=1,
                  gradient_accumulation_steps=2, batch_size=8)
    train_cli(data_dir, tmp_path / "one", **common)
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
             *settings(data_dir, tmp_path / "two", **common)], ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step: one CUDA graph" in r.stdout and "overlapped with the backward pass, inside the graph" in r.stdout, \
        r.stdout
    one, two = [[m for m in metrics(tmp_path / d) if "loss" in m] for d in ("one", "two")]
    assert [m["iter"] for m in one] == [m["iter"] for m in two] == list(range(1, 11))
    for a, b in zip(one, two):  # steps 1-3: eager warm-up; 4-10: replays of the graph
        assert b["loss"] == pytest.approx(a["loss"], rel=5e-3) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                   rel=5e-3)


def test_fit_iters_to_budget():
    # 100 s budget, 10 s spent at iteration 10, 1 s per step, an evaluation (with checkpoints) of 5 s every 20
    # iterations and at the end: n = 80 costs 10 + 70 + 4 evaluations (20, 40, 60, 80) = 100 s; n = 81 needs a
    # fifth one at the end (106 s)
    fit = train_module.fit_iters_to_budget
    train_module.eval_interval = 20
    try:
        assert fit(100, 10, 10, 1.0, 5.0, cap=10**6) == 80
        assert fit(100, 10, 10, 1.0, 5.0, cap=50) == 50  # max_iters caps it
        assert fit(5, 10, 10, 1.0, 5.0, cap=10**6) == 11  # over budget already: one more step, then stop
    finally:
        train_module.eval_interval = 2000


def test_budget_fixes_max_iters_and_resume_continues_it(data_dir, tmp_path):
    common = dict(max_iters=100000, eval_interval=20, log_interval=1)
    out = tmp_path / "budget"
    proc = subprocess.Popen([sys.executable, "train.py", *settings(data_dir, out, max_train_seconds=30.0, **common)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # stop the run once the budget has fixed max_iters
        lines.append(line)
        if line.startswith("budget 30 s: max_iters "):
            chosen = int(line.split()[4])
            proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, "".join(lines)
    stopped = load_checkpoint(out / "ckpt.pt")
    assert stopped["budget_max_iters"] == chosen and stopped["iter_num"] < chosen, "".join(lines)

    # resumed, the run keeps the schedule it fixed: the same as being told max_iters=chosen without a budget
    twin = tmp_path / "twin"
    shutil.copytree(out, twin)
    r = train_cli(data_dir, out, max_train_seconds=30.0, **common)
    assert "budget 30 s" not in r.stdout and f"iter {chosen}/{chosen}" in r.stdout
    train_cli(data_dir, twin, **{**common, "max_iters": chosen})
    a, b = load_checkpoint(out / "ckpt.pt"), load_checkpoint(twin / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == chosen and metrics(out)[-1]["iter"] == chosen
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_resume_after_a_budget_says_what_trains_further(data_dir, tmp_path, monkeypatch, capsys):
    """A resumed budgeted run keeps the max_iters its budget fixed: the notes name what does train further (and
    that does), and say so when --max_iters or --max_train_seconds would have asked for another schedule."""
    out = tmp_path / "run"
    in_process_train(data_dir, out, monkeypatch, max_iters=10, eval_interval=10)
    ckpt = load_checkpoint(out / "ckpt.pt")  # as if a 30 s budget had fixed max_iters at 10, under a cap of 100000
    ckpt["budget_max_iters"] = 10
    ckpt["config"].update(max_iters=100000, max_train_seconds=30.0)
    save_checkpoint(ckpt, out / "ckpt.pt")
    capsys.readouterr()

    def resume(**extra):
        in_process_train(data_dir, out, monkeypatch, **{"max_iters": 100000, "max_train_seconds": 30.0, **extra})
        assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 10  # nothing trained
        return capsys.readouterr().err
    err = resume()
    assert "nothing to train" in err and "e.g. --max_train_seconds=0 --max_iters=20" in err and "not used" not in err
    for extra, unused in ((dict(max_iters=20), "--max_iters=20"), (dict(max_train_seconds=60.0),
                                                                   "--max_train_seconds=60")):
        err = resume(**extra)
        assert f"note: {unused} not used: {out / 'ckpt.pt'}'s time budget fixed max_iters at 10" in err, err
        assert "turn the budget off: --max_train_seconds=0 --max_iters=20" in err
    in_process_train(data_dir, out, monkeypatch, max_iters=20, max_train_seconds=0.0)  # the advice works
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 20


def test_resume_keeps_the_precision_auto_chose(data_dir, tmp_path):
    """dtype="auto" on a CPU is a measurement (bfloat16 where the CPU multiplies it fast): a resumed run takes the
    checkpoint's choice, not a new measurement's, so it continues exactly as the stopped run would have."""
    def run_with(fast_bf16, **extra):
        wrapper = (f"import sys, runpy, model; model.fast_bf16_matmul = lambda device: {fast_bf16}; "
                   "sys.argv = ['train.py'] + sys.argv[1:]; runpy.run_path('train.py', run_name='__main__')")
        r = run(["-c", wrapper, *settings(data_dir, tmp_path / "run", **extra)], ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout
    assert "dtype bfloat16" in run_with(True, max_iters=10, eval_interval=10)
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["precision"] == {"device_type": "cpu", "dtype": "bfloat16"}
    assert "dtype bfloat16 (auto: as the checkpoint was trained)" in run_with(False, max_iters=20, eval_interval=10)
    assert "dtype float32" in run_with(False, max_iters=20, eval_interval=10, init_from="scratch")


@needs_cuda
def test_compiled_blocks_keep_their_dtype_from_run_to_run(data_dir, tmp_path):
    """Compiled blocks come back from the on-disk caches on the next run; a bfloat16 run after a float16 one on
    the same caches takes bitwise the steps of a bfloat16 run that compiles afresh (before 2.13, PyTorch's
    AOTAutograd cache would hand it the float16 blocks: model.compile_regions turns that cache off there).
    On CUDA: there the first block's graph is the same in both dtypes up to its casts, so the two runs would
    share its cache entry (on a CPU bfloat16 attention takes another path, so nothing would collide)."""
    common = dict(device="cuda", compile=True, max_iters=4, eval_interval=4, eval_iters=1, log_interval=1)

    def losses(name, dtype, cache):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / cache))
        r = run(["train.py", *settings(data_dir, tmp_path / name, dtype=dtype, **common)], ROOT, env=env)
        assert r.returncode == 0 and "compile True" in r.stdout, r.stdout + r.stderr
        return [m["loss"] for m in metrics(tmp_path / name) if "loss" in m]

    other = losses("float16", "float16", "shared")
    after, fresh = losses("after", "bfloat16", "shared"), losses("fresh", "bfloat16", "fresh")
    assert after == fresh and after != other
