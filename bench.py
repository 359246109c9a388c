"""
Benchmarks: tinyllm's speed on this machine, each figure next to a baseline measured in the same run.

    python bench.py            # everything that fits the device: the CPU, and the GPU when there is one
    python bench.py sample     # sampling only
    python bench.py train      # training only

Models are randomly initialised at the seed shape (dim 288, 8 layers, 8 heads, 4 kv heads, vocab 4096, context 256):
no checkpoint or data needed. Figures are medians of a few repeats; compare ratios within a run, never figures
across machines. Rows are printed as a table at the end, after a line naming the machine.
"""

import platform
import statistics
import sys
import time

import torch

from model import ModelArgs, Transformer, autocast_ctx, pick_dtype, sample_next

# -----------------------------------------------------------------------------
SEED_SHAPE = dict(dim=288, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=4096, max_seq_len=256)
SHAPE_NAME = "seed: 288d 8L 8/4h v4096"
REPEATS = 3  # each figure is the median of this many timed runs, after one untimed run
# sampling
SAMPLE_BATCHES = (1, 16)
SAMPLE_NEW_TOKENS = 256  # after a one-token prompt (BOS): the window is exactly full at the last token
SAMPLE_SETTINGS = dict(temperature=0.8, top_k=200)  # sample.py's defaults
# -----------------------------------------------------------------------------


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
    return Transformer(ModelArgs(**SEED_SHAPE)).to(device).eval()


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


def time_sampling(steps, device):
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
                time_sampling(steps(idx), device)  # untimed: first-call costs (CUDA context, cuBLAS, allocator)
                runs = [time_sampling(steps(idx), device) for _ in range(REPEATS)]
            rate = statistics.median(r[1] for r in runs)
            baseline = baseline or rate
            rows.append({"bench": "sample", "device": device, "dtype": dtype, "shape": SHAPE_NAME, "batch": batch,
                         "new tokens": SAMPLE_NEW_TOKENS, "path": path, "tokens/s": f"{rate:,.0f}",
                         "warm-up s": f"{statistics.median(r[0] for r in runs):.3f}",
                         "vs baseline": f"{rate / baseline:.2f}x"})
    return rows


# -----------------------------------------------------------------------------

def print_table(rows):
    """Rows (dicts) as an aligned text table; columns in order of first appearance, blank where a row has none."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [columns] + [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


BENCHES = {"sample": bench_sampling}


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what not in ("all", *BENCHES) or len(sys.argv) > 2:
        raise SystemExit(f"error: unknown benchmark {' '.join(sys.argv[1:])!r}; run `python bench.py` with one of: "
                         f"all, {', '.join(BENCHES)}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for name, bench in BENCHES.items():
            if what in ("all", name):
                print(f"running {name} on {device} ...", file=sys.stderr)
                rows += bench(device)
    print(f"torch {torch.__version__}; " + "; ".join(f"{d}: {device_name(d)}" for d in devices))
    print_table(rows)


if __name__ == "__main__":
    main()
