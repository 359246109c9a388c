"""
Benchmarks on synthetic tokens: how fast tinyllm trains (and samples) on this machine.

    python bench.py          # everything that fits the device
    python bench.py train    # training only
    python bench.py sample   # sampling only

Training goes through train.py's own step (its Stepper, optimizers and compile setup), for each shape twice in
the same run: the plain path (torch.compile only, no CUDA graph, micro-batches as given: what llama2.c does)
and the fast path (train.py's default: micro-batches merged when they fit, the whole step replayed as one CUDA
graph). On a GPU it runs the four shapes of README.md's "How fast is it"; on a CPU the tiny config's shape for
a few iterations. Each row: median ms per iteration (the step and its input copies, timed with CUDA events),
tokens/s, MFU (model FLOPs over the GPU's peak dense bf16 FLOP/s), peak memory, and the loss of the last step
(the two paths must agree). Then the seconds from process start to the first training step of a real
`python train.py` run, with a cold inductor cache and again warm.

Sampling (on the CPU, and on the GPU when there is one): tokens/s of generate_stream at batch 1 and 16 for 256 new
tokens at the seed shape (random weights), next to the old one-forward-per-token loop measured in the same run,
and the warm-up before the first token separately.
"""

import contextlib
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import train
from configurator import configure, settings_of
from model import ModelArgs, Transformer, autocast_ctx, pick_device, pick_dtype, sample_next

# -----------------------------------------------------------------------------
# the training shapes: (name, model shape, micro-batch, accumulation steps)
SEED = dict(dim=288, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=4096, max_seq_len=256)
GPU_SHAPES = [
    ("seed 8x4", SEED, 8, 4),
    ("seed 128x4", SEED, 128, 4),
    ("stories15M 128x4", dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, max_seq_len=256), 128, 4),
    ("stories110M 32x4", dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000, max_seq_len=1024),
     32, 4),
]
TIMED_ITERS = 30  # per path and shape on a GPU (fewer for slow shapes: about 5 s each at most)
# sampling
SHAPE_NAME = "seed: 288d 8L 8/4h v4096"
REPEATS = 3  # each sampling figure is the median of this many timed runs, after one untimed run
SAMPLE_BATCHES = (1, 16)
SAMPLE_NEW_TOKENS = 256  # after a one-token prompt (BOS): the window is exactly full at the last token
SAMPLE_SETTINGS = dict(temperature=0.8, top_k=200)  # sample.py's defaults
# -----------------------------------------------------------------------------


def tiny_shape():
    """configs/tiny.py's model shape and batch."""
    g = {k: getattr(train, k) for k in settings_of(vars(train))}
    configure(g, [os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py")])
    shape = {k: g[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")}
    return "tiny", shape, g["batch_size"], g["gradient_accumulation_steps"]


def measure(name, shape, batch_size, accum, device, fast, iters):
    """Train `iters` timed iterations (after warm-up: compilation, capture) through train.py's Stepper."""
    device_type = torch.device(device).type
    cuda = device_type == "cuda"
    torch._dynamo.reset()  # each row compiles its own shapes, as a fresh train.py run would
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**shape)).to(device)
    if cuda:
        model.compile_regions()
    dtype = pick_dtype("auto", device, training=True)
    with contextlib.redirect_stdout(io.StringIO()):  # build_optimizers' own lines
        optimizers = train.build_optimizers(model, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    stepper, line = train.make_stepper(model, optimizers, scaler, accum, batch_size, shape["max_seq_len"], device,
                                       dtype, 1.0, None, fast)
    gen = torch.Generator().manual_seed(0)
    pool = [torch.randint(0, shape["vocab_size"], (batch_size, shape["max_seq_len"] + 1), generator=gen)
            for _ in range(3 * accum)]  # a few iterations' worth of batches, in turn
    warmup = train.Stepper.warmup_steps + 3 if fast else 3
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    marks = []
    for it in range(warmup + iters + 1):
        marks.append(torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter())
        if cuda:
            marks[-1].record()
        if it == warmup + iters:
            break
        train.set_lr(optimizers, it)
        batches = [pool[(it * accum + i) % len(pool)] for i in range(accum)]
        stepper.load([b[:, :-1] for b in batches], [b[:, 1:] for b in batches])
        stepper()
    if cuda:
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in zip(marks[warmup:], marks[warmup + 1:])]
    else:
        times = [(b - a) * 1000 for a, b in zip(marks[warmup:], marks[warmup + 1:])]
    ms = statistics.median(times)
    tokens = accum * batch_size * shape["max_seq_len"]
    mfu = model.estimate_mfu(accum * batch_size, ms / 1000)
    return {"shape": name, "path": "fast" if fast else "plain", "tokens/iter": tokens, "ms/iter": ms,
            "tok/s": tokens / ms * 1000, "MFU %": None if mfu != mfu else 100 * mfu,
            "peak GiB": torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None,
            "loss": stepper.stats["loss"].item(), "step": line.removeprefix("step: ")}


def bench_training(device) -> list[dict]:
    cuda = torch.device(device).type == "cuda"
    shapes = GPU_SHAPES if cuda else [tiny_shape()]
    rows = []
    for name, shape, batch_size, accum in shapes:
        pair = []
        for fast in ((False, True) if cuda else (False,)):
            iters = (TIMED_ITERS if shape["dim"] < 512 else 15) if cuda else 5
            pair.append(measure(name, shape, batch_size, accum, device, fast, iters))
            print(f"  {name} {pair[-1]['path']}: {pair[-1]['ms/iter']:.2f} ms/iter", file=sys.stderr, flush=True)
        if len(pair) == 2:
            pair[1]["speed-up"] = pair[0]["ms/iter"] / pair[1]["ms/iter"]
        rows += pair
    return rows


def bench_first_step(device) -> list[dict]:
    """Seconds from process start to the first step of `python train.py` (seed shape), cold and warm.

    Cold: an empty inductor cache (TORCHINDUCTOR_CACHE_DIR pointed at a new directory); warm: the same run again,
    which finds the kernels of the first in that cache, as a user's second run finds them in the default place.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(os.path.join(tmp, "raw"))
        gen = torch.Generator().manual_seed(0)
        letters = "abcdefghijklmnopqrstuvwxyz"
        words = ["".join(letters[i] for i in torch.randint(0, 26, (int(n),), generator=gen))
                 for n in torch.randint(2, 9, (3000,), generator=gen)]
        picks = torch.randint(0, len(words), (400_000,), generator=gen).tolist()
        with open(os.path.join(tmp, "raw", "words.txt"), "w") as f:
            for i in range(0, len(picks), 60):
                f.write(" ".join(words[j] for j in picks[i:i + 60]) + "\n\n")
        vocab = 4096
        for verb in ("train_vocab", "pretokenize"):
            subprocess.run([sys.executable, os.path.join(here, "preprocess.py"), verb, f"--vocab_size={vocab}",
                            f"--input={os.path.join(tmp, 'raw')}", f"--data_dir={data}"],
                           check=True, capture_output=True)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))
        for kind in ("cold", "warm"):
            out = os.path.join(tmp, f"out_{kind}")
            args = [f"--data_dir={data}", "--data_source=custom", f"--out_dir={out}", f"--vocab_size={vocab}",
                    f"--device={device}", "--max_iters=5", "--warmup_iters=1", "--eval_iters=1", "--log_interval=1"]
            t0 = time.time()
            r = subprocess.run([sys.executable, os.path.join(here, "train.py"), *args], env=env,
                               capture_output=True, text=True)
            found = re.search(r"first step done ([0-9.]+) s after start", r.stdout)
            if r.returncode != 0 or not found:
                raise SystemExit(f"error: train.py failed in bench.py's first-step run:\n{r.stdout}\n{r.stderr}")
            rows.append({"run": f"train.py, seed shape, {kind} inductor cache", "s to first step": float(found[1]),
                         "s for the process": time.time() - t0})
    return rows


# -----------------------------------------------------------------------------
# the machine and the model sampled from

def cpu_name():
    """The CPU's model name as lscpu prints it (from /proc/cpuinfo), else what Python knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def seed_model(device):
    torch.manual_seed(0)
    return Transformer(ModelArgs(**SEED)).to(device).eval()


# -----------------------------------------------------------------------------
# sampling

@torch.inference_mode()
def forward_per_token(model, idx, max_new_tokens, temperature=1.0, top_k=None):
    """The plain loop: model.forward for each new token, with a KV cache (generate() before Decoder existed).

    Yields each new token column; no window sliding, so the prompt plus the new tokens must fit max_seq_len.
    """
    a = model.args
    shape = (idx.shape[0], a.n_kv_heads, a.max_seq_len, a.dim // a.n_heads)
    dtype = model.tok_embeddings.weight.dtype
    cache = [(torch.zeros(shape, dtype=dtype, device=idx.device), torch.zeros(shape, dtype=dtype, device=idx.device))
             for _ in range(a.n_layers)]
    tokens, pos = idx, 0
    for _ in range(max_new_tokens):
        logits = model(tokens, cache=cache, start_pos=pos)
        pos += tokens.shape[1]
        tokens = sample_next(logits[:, -1, :].float(), temperature, top_k)[:, None]
        yield tokens[:, 0]


def time_sampling(steps):
    """(seconds to the first token, tokens/s after it) for a generator of token columns, read as they come."""
    t0 = time.perf_counter()
    first, n = None, 0
    for column in steps:
        column.tolist()  # a streaming reader needs each token on the host: a sync per step, as in sample.py
        n += len(column)
        if first is None:
            first, n = time.perf_counter(), 0
    return first - t0, n / (time.perf_counter() - first)


def bench_sampling(device) -> list[dict]:
    """tokens/s of generate_stream at batch 1 and 16 (the CUDA graph on a GPU), against the plain loop."""
    model = seed_model(device)
    dtype = pick_dtype("auto", device)
    paths = {"forward per token (baseline)": lambda idx: forward_per_token(model, idx, SAMPLE_NEW_TOKENS,
                                                                           **SAMPLE_SETTINGS)}
    if device == "cuda":
        paths["decode step, eager"] = lambda idx: model.generate_stream(idx, SAMPLE_NEW_TOKENS, cuda_graph=False,
                                                                        **SAMPLE_SETTINGS)
        paths["decode step, CUDA graph"] = lambda idx: model.generate_stream(idx, SAMPLE_NEW_TOKENS,
                                                                             **SAMPLE_SETTINGS)
    else:
        paths["decode step"] = lambda idx: model.generate_stream(idx, SAMPLE_NEW_TOKENS, **SAMPLE_SETTINGS)
    rows = []
    for batch in SAMPLE_BATCHES:
        idx = torch.ones(batch, 1, dtype=torch.long, device=device)  # BOS
        baseline = None
        for path, steps in paths.items():
            with autocast_ctx(device, dtype):
                time_sampling(steps(idx))  # untimed: first-call costs (CUDA context, cuBLAS, allocator)
                runs = [time_sampling(steps(idx)) for _ in range(REPEATS)]
            rate = statistics.median(r[1] for r in runs)
            baseline = baseline or rate
            rows.append({"bench": "sample", "device": device, "dtype": dtype, "shape": SHAPE_NAME, "batch": batch,
                         "new tokens": SAMPLE_NEW_TOKENS, "path": path, "tokens/s": f"{rate:,.0f}",
                         "warm-up s": f"{statistics.median(r[0] for r in runs):.3f}",
                         "vs baseline": f"{rate / baseline:.2f}x"})
    return rows


def print_table(rows):
    """One markdown table; None prints as a dash."""
    if not rows:
        return
    cols = list(dict.fromkeys(k for row in rows for k in row))

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    cells = [[fmt(row.get(c)) for c in cols] for row in rows]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(" --- " for _ in cols) + "|")
    for line in cells:
        print("| " + " | ".join(line) + " |")
    print()


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what not in ("all", "train", "sample") or len(sys.argv) > 2:
        raise SystemExit(f"error: unknown benchmark {' '.join(sys.argv[1:])!r}; run `python bench.py` with one of: "
                         "all, train, sample (see its docstring)")
    device = pick_device("auto")
    devices = ["cpu"] + (["cuda"] if device.startswith("cuda") else [])
    print(f"bench.py: torch {torch.__version__}; " + "; ".join(f"{d}: {device_name(d)}" for d in devices))
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if what in ("all", "train"):
        print_table(bench_training(device))
        if device.startswith("cuda"):  # (no compilation on a CPU: nothing to warm)
            print_table(bench_first_step(device))
    if what in ("all", "sample"):
        for d in devices:
            print_table(bench_sampling(d))


if __name__ == "__main__":
    main()
