"""
Train a small Llama-style language model.

    python train.py configs/tiny.py                  # the CPU quickstart on Shakespeare (prepares its data)
    python train.py configs/tiny.py --batch_size=16  # any setting below can be overridden
    python train.py configs/tiny.py --max_iters=3000 # re-running resumes from out_dir/ckpt.pt (init_from="auto")
    torchrun --standalone --nproc_per_node=4 train.py configs/stories15M.py   # data parallel on 4 GPUs

Settings are the globals below; configurator.py applies a config file and --key=value overrides to them.
Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and exits; run again to resume.
"""

import datetime
import importlib
import io
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import NamedTuple

PROCESS_START = time.time()  # before torch is imported: the banner reports the seconds to the first step

import numpy as np
import torch
import torch.distributed as dist

from configurator import configure, fail, settings_of
from model import (ModelArgs, Muon, Transformer, adamw, autocast_ctx, checkpoint_dict, fast_bf16_matmul,
                   load_checkpoint, pick_device, pick_dtype, save_checkpoint, set_cpu_fast_bf16)
from preprocess import Task, Tokenizer, atomic_write, load_meta

# -----------------------------------------------------------------------------
# I/O
out_dir = "output"
eval_interval = 2000  # evaluate and write out_dir/ckpt.pt every this many iterations (and at the end)
log_interval = 1
eval_iters = 100  # batches per split for each evaluation
eval_only = False  # evaluate out_dir/ckpt.pt once, print the losses and exit; writes nothing
keep_best = True  # also keep the model with the best val loss so far as out_dir/best.pt
init_from = "auto"  # "scratch", "resume" (from out_dir/ckpt.pt) or "auto" (resume when ckpt.pt exists)
wandb_log = False
wandb_project = "tinyllm"
wandb_run_name = "run"
# data
data_source = "shakespeare"  # what data_dir's shards are made from, for when they are missing: "shakespeare" is
# downloaded and prepared then; "tinystories" or anything else (your own text) gets the commands that make them
data_dir = "data"  # holds tok{vocab_size}.model and the tok{vocab_size}/ shards
batch_size = 8  # micro-batch size (per process)
max_seq_len = 256
vocab_size = 4096
# model
dim = 288
n_layers = 8
n_heads = 8
n_kv_heads = 4
multiple_of = 32
dropout = 0.0
rope_theta = 10000.0
# optimizer
optimizer = "adamw"  # "adamw", or "muon": Muon for the 2-D hidden weights, AdamW for embeddings and norms
gradient_accumulation_steps = 4  # micro-steps per iteration, summed over all processes
learning_rate = 5e-4  # peak AdamW learning rate
muon_lr = 0.02  # peak Muon learning rate (optimizer="muon" only)
max_iters = 100000
max_train_seconds = 0.0  # > 0: a wall-clock budget; max_iters (and the LR schedule) is fitted to it, max_iters is then a cap
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this (0: off)
max_bad_steps = 10  # stop after this many consecutive steps with a non-finite loss or gradient
# learning rate schedule
lr_schedule = "cosine"  # "cosine", "wsd" (warmup-stable-decay) or "constant"
warmup_iters = 1000
lr_decay_iters = 0  # where the decay ends; 0: max_iters
min_lr = 0.0  # the learning rate at the end of the decay (as a fraction: min_lr / learning_rate for Muon)
wsd_decay_frac = 0.2  # wsd: the last fraction of lr_decay_iters that decays linearly to min_lr
# system
device = "auto"  # "auto" (cuda, mps, cpu in that order), "cpu", "cuda", "cuda:1", "mps"
dtype = "auto"  # "auto" (bfloat16 where fast: GPUs, CPUs with AVX512-BF16/AMX; float16 on older GPUs; else float32)
compile = None  # torch.compile each block (regional compilation); None: on for CUDA, off for CPU/MPS
cuda_graph = True  # CUDA: merge micro-batches that fit and replay the whole step as one CUDA graph; False: plain step
seed = 1337
ddp_timeout = 300  # seconds: under torchrun, a process that dies or hangs ends the whole job within about this long
peak_flops = 0.0  # the device's peak FLOP/s for MFU; 0: look it up from the GPU's name
# -----------------------------------------------------------------------------
# old names still accepted, with a one-line note (configurator.py): old name -> (new name, old value -> new value)
DEPRECATED = {
    "always_save_checkpoint": ("keep_best", lambda v: not v if isinstance(v, bool) else v),  # it only decided best.pt
    "dataset": ("data_source", lambda v: v),  # it selected no data (data_dir does)
}


def lr_at(it):
    """The AdamW learning rate for iteration it (Muon scales its own peak by the same factor)."""
    decay_end = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)  # > 0 from the very first step
    if lr_schedule == "constant" or it >= decay_end:
        return learning_rate if lr_schedule == "constant" else min_lr
    if lr_schedule == "cosine":
        progress = (it - warmup_iters) / max(1, decay_end - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)
    # wsd: hold the peak, then decay linearly over the last wsd_decay_frac of the run
    decay_start = decay_end - int(wsd_decay_frac * decay_end)
    if it < decay_start:
        return learning_rate
    return learning_rate + (min_lr - learning_rate) * (it - decay_start) / max(1, decay_end - decay_start)


def build_optimizers(model, device_type):
    """One AdamW, or Muon + AdamW; every param group remembers its peak lr so the schedule can scale it."""
    betas = (beta1, beta2)
    if optimizer == "adamw":
        optimizers = [model.configure_optimizers(weight_decay, learning_rate, betas, device_type)]
    elif optimizer == "muon":
        hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("layers.")]
        embed = [model.tok_embeddings.weight]  # also the (tied) output matrix
        norms = [p for p in model.parameters() if p.dim() < 2]
        print(f"Muon: {len(hidden)} hidden matrices; AdamW: embeddings and {len(norms)} norm gains")
        optimizers = [
            Muon(hidden, lr=muon_lr, weight_decay=weight_decay),
            adamw([{"params": embed, "weight_decay": weight_decay}, {"params": norms, "weight_decay": 0.0}],
                  learning_rate, betas, device_type),
        ]
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def load_optimizer_states(optimizers, states, path):
    """Moments and step counts from the checkpoint; lr, betas and weight decay from this run's settings."""
    if len(states) != len(optimizers):
        raise SystemExit(f"error: {path} holds the state of another optimizer; resume with the optimizer it was "
                         f"trained with, or {FRESH_START_CHOICES}")
    for opt, state in zip(optimizers, states):
        # Muon's Newton-Schulz precision (ns_dtype) belongs to the run, like its moments: keep the checkpoint's
        settings = [{k: v for k, v in group.items() if k not in ("params", "ns_dtype")} for group in opt.param_groups]
        try:
            opt.load_state_dict(state)
        except ValueError as e:
            raise SystemExit(f"error: {path} holds the state of another optimizer ({e}); resume with the optimizer "
                             f"it was trained with, or {FRESH_START_CHOICES}") from None
        for group, setting in zip(opt.param_groups, settings):
            group.update(setting)


def set_lr(optimizers, it):
    scale = lr_at(it) / learning_rate
    for opt in optimizers:
        for group in opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # a captured step reads it on the device
                group["lr"].fill_(group["peak_lr"] * scale)
            else:
                group["lr"] = group["peak_lr"] * scale


# -----------------------------------------------------------------------------
# the training step

class GradBuffer:
    """Data parallel without a wrapper: every parameter's .grad is a view into one flat buffer per dtype, allocated
    once, and the buffers are summed over all processes bucket by bucket while the backward pass still runs.

    The parameters lie in the buffers in reverse order, roughly the order backward produces their gradients, and
    each bucket (a slice of about bucket_bytes) starts its all_reduce as soon as the last micro-batch's backward
    has accumulated every gradient in it (a post-accumulate-grad hook), as DDP's reducer does; finish() waits for
    them. Buckets start in the same order on every process, as collectives must. The mean loss rides along in one
    extra element at the end of the float32 buffer, so every process logs the global mean and sees the same
    non-finite verdict. Plain collectives on fixed buffers are what lets a CUDA graph capture the whole step, the
    all_reduces included (NCCL's stream forks from the backward's and joins it again in finish()).
    """

    bucket_bytes = 25 * 2 ** 20  # DDP's default: large enough to keep the link busy, small enough to start early

    def __init__(self, params, world_size):
        params = [p for p in params if p.requires_grad]
        self.world_size = world_size
        by_dtype = {torch.float32: []}
        for p in reversed(params):
            by_dtype.setdefault(p.dtype, []).append(p)
        self.buffers, self.buckets, bucket_of = [], [], {}
        for dtype, ps in by_dtype.items():
            extra = 1 if dtype == torch.float32 else 0
            flat = torch.zeros(sum(p.numel() for p in ps) + extra, dtype=dtype, device=params[0].device)
            offset, start = 0, 0
            for p in ps:
                if offset > start and (offset + p.numel() - start) * flat.element_size() > self.bucket_bytes:
                    self.buckets.append(flat[start:offset])
                    start = offset
                p.grad = flat[offset:offset + p.numel()].view_as(p)
                bucket_of[p] = len(self.buckets)
                offset += p.numel()
            if extra:
                self.loss = flat[offset]
            if offset + extra > start:
                self.buckets.append(flat[start:offset + extra])
            self.buffers.append(flat)
        self.waiting = [0] * len(self.buckets)  # gradients each bucket still waits for
        for p in params:
            self.waiting[bucket_of[p]] += 1
            p.register_post_accumulate_grad_hook(lambda p, b=bucket_of[p]: self._accumulated(b))
        self.armed, self.left, self.started, self.works = False, [], 0, []

    def zero_(self):
        for flat in self.buffers:
            flat.zero_()
        self.armed = False  # (a step that raised between arm() and finish() left it set)

    def arm(self, loss):
        """Before the last micro-batch's backward: its gradients complete the buckets, which then start. loss: the
        mean loss so far (a 0-d float32 tensor), summed along with the gradients."""
        self.loss.copy_(loss)
        self.armed, self.left, self.started, self.works = True, list(self.waiting), 0, []

    def _accumulated(self, bucket):
        if not self.armed:
            return
        self.left[bucket] -= 1
        while self.started < len(self.buckets) and self.left[self.started] == 0:
            self._start()

    def _start(self):
        self.works.append(dist.all_reduce(self.buckets[self.started], async_op=True))
        self.started += 1

    def finish(self, loss):
        """After the backward pass: wait for every bucket's sum (starting any that a gradient never reached), and
        put the summed loss in loss."""
        while self.started < len(self.buckets):
            self._start()
        for work in self.works:
            work.wait()
        self.armed, self.works = False, []
        loss.copy_(self.loss)


STATS = ("loss", "grad_norm", "bad", "bad_steps", "skipped")  # train_step's results, in this order


def new_stats(device):
    """The 0-d tensors, on the device, that train_step writes its results into (STATS)."""
    return {k: torch.zeros((), device=device) for k in STATS}


def train_step(model, optimizers, scaler, x, y, stats, ctx, grad_clip, grads=None):
    """One optimizer step over the micro-batches x[i], y[i] (x, y: micro_steps x rows x seq_len, on the device).

    Forward/backward per micro-batch (gradients summed; with a GradBuffer, into it, and summed over processes in
    buckets during the last backward), clipping, the non-finite skip and the update. Its results go in place into
    the 0-d device tensors of stats (loss: the mean loss over all processes; grad_norm; bad: this step was skipped;
    bad_steps: consecutive skipped steps; skipped: all of them), with no host sync, so the same code runs eagerly
    or inside a CUDA graph.
    """
    micro_steps = x.shape[0]
    parts = micro_steps * (grads.world_size if grads is not None else 1)  # the mean over every micro-batch
    stats["loss"].zero_()
    if grads is not None:
        grads.zero_()
    for i in range(micro_steps):
        with ctx:
            model(x[i], y[i], return_logits=False)
            loss = model.last_loss / parts
            model.last_loss = model.last_loss.detach()  # keep no autograd graph alive past the step
        stats["loss"].add_(loss.detach().float())
        if grads is not None and i == micro_steps - 1:
            grads.arm(stats["loss"])  # this backward completes the gradients: their all_reduce starts during it
        scaler.scale(loss).backward()
    if grads is not None:
        grads.finish(stats["loss"])
    for opt in optimizers:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else 1e30)
    bad = ~torch.isfinite(stats["loss"]) | ~torch.isfinite(grad_norm)
    # fused AdamW and our Muon skip the update on the device when found_inf is set: no host sync, and every
    # optimizer skips together (GradScaler.step would skip each one on its own gradients' overflow only)
    for opt in optimizers:
        opt.grad_scale, opt.found_inf = None, bad.float()
        opt.step()
        del opt.grad_scale, opt.found_inf
    if scaler.is_enabled():
        scaler.update()  # float16: halve the scale after an overflow (found by unscale_ above), on the device
    if grads is None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    stats["grad_norm"].copy_(grad_norm)
    stats["bad"].copy_(bad)
    stats["bad_steps"].add_(1).mul_(bad)  # consecutive count: reset by a good step
    stats["skipped"].add_(bad)


def plan_micro_batches(accum, rows, seq_len, model_args, device, merge):
    """(micro_steps, rows): accum micro-batches of rows sequences, merged into fewer, larger ones when merge is on
    and the activations fit in half the free device memory. The same sequences in the same order give the same
    mean loss and gradient; only how many go through the model at once changes (fewer, larger kernels).
    """
    if not merge:
        return accum, rows
    a = model_args
    # activation bytes per token kept for the backward pass: per layer, bf16 copies of the block's inputs, q/k/v,
    # the attention output and the SwiGLU's hidden tensors, plus the float32 residual stream; the chunked LM
    # head holds one chunk of logits and their gradient (up to 4 GiB on a GPU), never the whole matrix.
    # (bench.py's peak memory on an H200, model, optimizer and that chunk included, came to 1.0x this at
    # stories110M's shape, 1.6x at stories15M's; half the free memory leaves room for the rest)
    per_token = a.n_layers * (24 * a.dim + 6 * a.hidden_dim) + 16 * a.dim
    budget = torch.cuda.mem_get_info(device)[0] / 2
    for micro_steps in (d for d in range(1, accum + 1) if accum % d == 0):
        if accum // micro_steps * rows * seq_len * per_token <= budget:
            return micro_steps, accum // micro_steps * rows
    return accum, rows


class Stepper:
    """train_step on static device buffers: run eagerly (the plain path), or captured once as a CUDA graph and
    replayed, so a whole step (every micro-batch, clipping, the skip, the optimizer) costs one launch.

    load() copies an iteration's micro-batches into the buffers (non_blocking from pinned memory); set_lr() fills
    the learning rates in place (device tensors when captured); calling the stepper takes the step. Capture follows
    PyTorch's recipe for whole-network capture: a few eager warm-up steps on a side stream (compilation, optimizer
    state), then capture; they are real training steps. Evaluation uses the model outside the graph; batches of
    another shape run eagerly and leave the graph as it is.
    """

    warmup_steps = 3

    def __init__(self, model, optimizers, scaler, micro_steps, rows, seq_len, device, ctx, grad_clip, grads, capture):
        self.model, self.optimizers, self.scaler, self.ctx = model, optimizers, scaler, ctx
        self.grad_clip, self.grads, self.capture = grad_clip, grads, capture
        self.x = torch.zeros((micro_steps, rows, seq_len), dtype=torch.long, device=device)
        self.y = torch.zeros_like(self.x)
        self.stats = new_stats(device)
        self.pin = torch.device(device).type == "cuda"
        self.graph, self.steps, self.odd = None, 0, None
        self.pending = [] if grads is not None and self.pin else None  # CUDA events: the ends of steps not waited for
        if capture:
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = torch.tensor(float(group["lr"]), device=device)
                    if "capturable" in group:  # AdamW's own check before it lets a graph capture its step
                        group["capturable"] = True

    def load(self, xs, ys):
        """The iteration's micro-batches (CPU tensors of the data stream's batch_size rows each)."""
        x, y = torch.cat(xs), torch.cat(ys)
        if x.shape != (self.x.shape[0] * self.x.shape[1], self.x.shape[2]):
            # not the captured shape: this step runs eagerly on its own tensors
            n = len(xs)
            self.odd = (x.view(n, -1, x.shape[1]).to(self.x.device), y.view(n, -1, y.shape[1]).to(self.x.device))
            return
        self.odd = None
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        self.x.copy_(x.view_as(self.x), non_blocking=True)
        self.y.copy_(y.view_as(self.y), non_blocking=True)

    def _run(self, x, y):
        train_step(self.model, self.optimizers, self.scaler, x, y, self.stats, self.ctx, self.grad_clip, self.grads)

    def __call__(self):
        if self.odd is not None:
            self._run(*self.odd)
        elif self.graph is not None:
            self.graph.replay()
        elif not self.capture:
            self._run(self.x, self.y)
        elif self.steps < self.warmup_steps:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run(self.x, self.y)
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.grads is None:  # the graph allocates the gradients in its own memory pool (else: the buffer)
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._run(self.x, self.y)
            self.graph.replay()  # capturing only recorded the step
        self.steps += 1
        if self.pending is not None:
            self.pending.append(torch.cuda.Event())
            self.pending[-1].record()

    def wait(self, timeout, event=None):
        """Under torchrun on CUDA, wait for the steps taken so far (or, given a CUDA event, for the work before it),
        each for at most timeout seconds (ddp_timeout); else return at once (the host reads that follow wait as
        they do).

        The process group's own timeout does not watch collectives captured in a CUDA graph: without this, a
        process that died or hangs would leave the others blocked for ever at their next read of the results.
        It polls, so SIGTERM/Ctrl-C handlers run meanwhile.
        """
        if self.pending is None:
            return
        for done in self.pending if event is None else [event]:
            t0 = time.time()
            while not done.query():
                if time.time() - t0 > timeout:
                    raise dist.DistError(f"no step ended for {timeout:.0f} s (ddp_timeout): a collective waits for a "
                                         "process that died or hangs")
                time.sleep(2e-4)
        self.pending = [e for e in self.pending if not e.query()]


class Results:
    """The step's results (Stepper.stats) on their way to the host, read at log iterations (and every
    max_bad_steps iterations): once training runs, the loop's only host syncs.

    A read makes the host wait for the device, and on a GPU the device then idles until the host has logged and
    launched the next step (on an H200 at stories15M's shape, 3-7 ms at every log iteration, in a 43 ms step).
    So with a captured step (deferred), take() copies them to pinned memory without waiting, and the loop reads
    the copy once it has launched the next step, which runs meanwhile. Elsewhere the host waits for each step
    anyway (the CPU) or launches kernels one by one: the copy is read at once. The loop
    times its log lines by when it reads them, which is when the step ended in both cases.
    Under torchrun a log iteration's copy also carries the stop flag summed over the processes: every process
    reads the same sum after the same iteration, so all of them stop at the same one.
    """

    def __init__(self, stepper, deferred, ddp, timeout):
        self.stepper, self.deferred, self.ddp, self.timeout = stepper, deferred, ddp, timeout
        # (iter_num, logging, lr, the copy, the CUDA event after it or None, the steps launched by then)
        self.taken = []

    def take(self, iter_num, logging, lr, stop_requested):
        """Copy the results of the step that ended at iteration iter_num, taken at learning rate lr (and at a log
        iteration under torchrun, this process's stop request summed over all of them)."""
        values = [self.stepper.stats[k] for k in STATS]
        if self.ddp and logging:
            # (torch.full, not torch.tensor: a copy from pageable host memory would wait for the step on the device)
            flag = torch.full((), float(stop_requested), device=values[0].device)
            dist.all_reduce(flag)
            values.append(flag)
        values, event = torch.stack(values), None
        if values.is_cuda:
            values = values.to("cpu", non_blocking=True)  # into pinned memory: filled once the device gets here
            event = torch.cuda.Event()
            event.record()
        self.taken.append((iter_num, logging, lr, values, event, self.stepper.steps))

    def ready(self, everything):
        """The copies taken, oldest first, as (iter_num, logging, {name: value, "lr": lr}, stop agreed), each
        waited for (bounded by the timeout under torchrun): when deferred, only those with a step launched after
        them, unless everything (the loop is about to evaluate, stop or end)."""
        n = sum(1 for *_, steps in self.taken if everything or not self.deferred or steps < self.stepper.steps)
        out = []
        for iter_num, logging, lr, values, event, _ in self.taken[:n]:
            if event is not None:
                self.stepper.wait(self.timeout, event)
                event.synchronize()
            v = values.tolist()
            out.append((iter_num, logging, dict(zip(STATS, v), lr=lr), len(v) > len(STATS) and v[-1] > 0))
        del self.taken[:n]
        return out


def make_stepper(model, optimizers, scaler, accum, batch_size, seq_len, device, dtype_name, grad_clip, grads, fast):
    """The Stepper for this run and the banner line that says which path it takes and why.

    grads: the GradBuffer of a data-parallel run (None for one process).
    """
    device_type = torch.device(device).type
    capture = fast and device_type == "cuda"  # the fast path: micro-batches merged, the step one CUDA graph
    micro_steps, rows = plan_micro_batches(accum, batch_size, seq_len, model.args, device, merge=capture)
    ctx = autocast_ctx(device, dtype_name, cache=not capture)
    stepper = Stepper(model, optimizers, scaler, micro_steps, rows, seq_len, device, ctx, grad_clip, grads, capture)
    why_not = "cuda_graph=False" if device_type == "cuda" else f"CUDA graphs need CUDA, not {device_type}"
    line = ("step: one CUDA graph (captured after %d warm-up steps)" % Stepper.warmup_steps if capture
            else "step: plain (not captured: %s)" % why_not)
    if grads is not None:
        n = grads.world_size
        line += (f"; gradients summed over {n} process{'es' if n > 1 else ''} in {len(grads.buckets)} all_reduce "
                 "bucket(s) overlapped with the backward pass" + (", inside the graph" if capture else ""))
    if micro_steps != accum:
        line += (f"; {accum} micro-batches of {batch_size} merged into {micro_steps} of {rows} (same gradient, "
                 "fewer launches)")
    return stepper, line


def optimizer_state(opt):
    """opt.state_dict() with plain-float learning rates (a captured step keeps them as device tensors)."""
    state = opt.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].item()
    return state


def fit_iters_to_budget(budget, elapsed, iter_now, s_per_iter, s_per_eval, cap):
    """The largest max_iters whose remaining steps and evaluations (with their checkpoints) end within budget.

    elapsed: seconds of the budget spent so far (at iteration iter_now). Evaluations come every eval_interval
    iterations and once more at the end; each one also writes ckpt.pt and maybe best.pt (in s_per_eval).
    """
    def cost(n):
        evals = n // eval_interval - iter_now // eval_interval + (n % eval_interval != 0)
        return elapsed + (n - iter_now) * s_per_iter + evals * s_per_eval
    lo, hi = iter_now + 1, max(iter_now + 1, cap)  # at least one more step: a run always ends on a checkpoint
    while lo < hi:  # cost grows with n: bisect for the last n that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
    return lo


def rng_state():
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def ensure_data(master):
    """Prepare the default corpus when its shards are missing; otherwise name the command that makes them."""
    shard_dir = os.path.join(data_dir, f"tok{vocab_size}")
    tokenizer_path = os.path.join(data_dir, f"tok{vocab_size}.model")
    if os.path.exists(os.path.join(shard_dir, "meta.json")) and os.path.exists(tokenizer_path):
        return
    if data_source != "shakespeare":
        raw = "data/raw/tinystories" if data_source == "tinystories" else "YOUR_TEXT_FILES"
        download = "`python preprocess.py download tinystories`, then " if data_source == "tinystories" else ""
        raise SystemExit(f"error: no tokenized data in {shard_dir}; make it with {download}`python preprocess.py "
                         f"train_vocab --vocab_size={vocab_size} --input {raw} --data_dir {data_dir}` and the same "
                         "with pretokenize (see README.md)")
    if master:
        print(f"preparing the default Shakespeare corpus in {data_dir} (once)")
        raw = os.path.join(data_dir, "raw", "shakespeare")
        verbs = [["download", "shakespeare", f"--data_dir={data_dir}"],
                 ["train_vocab", f"--vocab_size={vocab_size}", f"--data_dir={data_dir}", f"--input={raw}"],
                 ["pretokenize", f"--vocab_size={vocab_size}", f"--data_dir={data_dir}", f"--input={raw}"]]
        if os.path.exists(tokenizer_path):
            del verbs[1]  # never replace a tokenizer that is already there (it may be the user's own)
        for verb in verbs:
            cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "preprocess.py"), *verb]
            if subprocess.run(cmd).returncode != 0:
                raise SystemExit(f"error: `python preprocess.py {' '.join(verb)}` failed (see above)")


def metrics_history(path, upto):
    """The metrics.jsonl records up to iteration upto; later ones belong to a run that was cut off."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a run killed mid-write
                pass
    return [r for r in records if r["iter"] <= upto]


def plot_losses(history, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    logs = [r for r in history if "loss" in r]
    evals = [r for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in logs], [r["loss"] for r in logs], lw=0.6, alpha=0.5, label="train (batch)")
    ax.plot([r["tokens"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
    ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    try:
        atomic_write(path, png.getvalue())
    except OSError as e:  # a plot is not worth stopping a run for (a full disk stops it at the checkpoint)
        print(f"warning: could not write {path} ({e.strerror or e})", file=sys.stderr)


class Budget:
    """max_train_seconds: time a few warm steps, then fix max_iters so that training ends within the budget.

    The clock starts with the training loop (data preparation and start-up are not in it); evaluations and
    checkpoints are. The steps before the choice take their learning rates from the schedule with max_iters as
    given (a cap): the same rates as after it while they are in the warm-up (tiny: 20 steps; timing takes ~12) or
    in wsd's stable phase. The choice goes into the checkpoint: a resumed run continues the same schedule instead
    of fitting a new one to the time left.
    """

    def __init__(self, seconds, device_type, start_iter):
        self.seconds, self.device_type = seconds, device_type
        self.t_start = time.time()
        self.first = start_iter + 3  # the steps before it compile, fill caches and warm the allocator
        self.t_first = None
        self.eval_seconds = 0.0  # the longest evaluation (with its checkpoints) seen so far

    def now(self):
        if self.device_type == "cuda":
            torch.cuda.synchronize()  # only while timing: a few steps of the run
        return time.time()

    def timed(self, iter_num, ddp, dev):
        """Whether enough warm steps have been timed (at least 5 and a second's worth, or 50). Under torchrun rank
        0's clock decides for all: by their own clocks, processes could enter fit()'s broadcast at different
        iterations, where it would meet another process's collective instead."""
        if iter_num == self.first:
            self.t_first = self.now()
        if self.t_first is None or iter_num == self.first:
            return False
        n, seconds = iter_num - self.first, self.now() - self.t_first
        done = n >= 50 or (n >= 5 and seconds >= 1.0)
        if ddp:
            verdict = torch.full((), float(done), device=dev)
            dist.broadcast(verdict, src=0)
            done = verdict.item() > 0
        return done

    def fit(self, iter_num, model, optimizers, ddp, dev, master):
        s_per_iter = (self.now() - self.t_first) / (iter_num - self.first)
        # a checkpoint costs about what serialising the state costs (twice: ckpt.pt and best.pt), plus writing it
        t = time.time()
        torch.save([model.state_dict(), [o.state_dict() for o in optimizers]], io.BytesIO())
        s_per_eval = self.eval_seconds + 3 * (time.time() - t)
        if not self.eval_seconds:  # no evaluation seen (a resumed run): 2 x eval_iters forward passes
            s_per_eval += 2 * eval_iters / max(1, gradient_accumulation_steps) * s_per_iter / 3
        elapsed = time.time() - self.t_start
        chosen = fit_iters_to_budget(self.seconds * 0.98, elapsed, iter_num, s_per_iter, s_per_eval, max_iters)
        if ddp:  # every process must stop at the same iteration: rank 0's measurement decides
            agreed = torch.tensor(chosen, device=dev)
            dist.broadcast(agreed, src=0)
            chosen = int(agreed.item())
        if master:
            print(f"budget {self.seconds:.0f} s: max_iters {chosen} ({s_per_iter * 1000:.1f} ms per iteration, "
                  f"{s_per_eval:.1f} s per evaluation with its checkpoints, {elapsed:.1f} s spent before "
                  f"iteration {iter_num}; 2% held back)" + (f"; capped by max_iters {max_iters}"
                                                              if chosen == max_iters else ""), flush=True)
            if chosen <= warmup_iters:
                print(f"warning: the budget fits only {chosen} iterations, within warmup_iters={warmup_iters}; "
                      "give it more time or lower warmup_iters")
        return chosen


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, writes a checkpoint and exits.

    The handler only records the signal: it runs wherever the signal lands (mid-step, or inside another print),
    and a print there could raise from that place ("reentrant call" inside a print, BrokenPipeError when the
    reader of a piped stdout went with the same Ctrl-C). The loop says so when it reads the flag (requested())."""

    def __init__(self):
        self.signal = None
        self.noted = False
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C stops at once

    def requested(self):
        """Whether a signal asked to stop (said once, the first time it is read)."""
        if self.signal is not None and not self.noted:
            self.noted = True
            print(f"\n{self.signal} received: finishing this step, then saving a checkpoint", flush=True)
        return self.signal is not None


class DropWhenUnread:
    """sys.stdout or sys.stderr, except that once the reader of its pipe has gone, what is written is dropped:
    the file descriptor is pointed at os.devnull (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
    Ctrl-C on `python train.py | tee log` ends tee too; without this the next print (or the flush at exit) raised
    BrokenPipeError, and the run died without its checkpoint instead of saving and exiting 0."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.drop()
            return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.drop()

    def drop(self):
        # the descriptor itself: the text still in the stream's buffer (flushed at exit) goes to os.devnull too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())
        os.close(devnull)

    def __getattr__(self, name):  # the rest (fileno, encoding, ...) is the stream's
        return getattr(self.stream, name)


def model_args_from_settings():
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                     multiple_of=multiple_of, max_seq_len=max_seq_len, dropout=dropout, rope_theta=rope_theta)


def check_settings():
    """One-line errors, exit code 2, for settings no run can use: before anything is prepared, loaded or written."""
    for name in ("batch_size", "max_seq_len", "vocab_size", "gradient_accumulation_steps", "eval_interval",
                 "eval_iters", "log_interval", "max_bad_steps"):
        if globals()[name] < 1:
            fail(f"--{name} must be >= 1, not {globals()[name]}")
    if max_iters < 0 or learning_rate <= 0 or muon_lr <= 0 or min_lr < 0 or warmup_iters < 0:
        fail("max_iters, warmup_iters and min_lr must be >= 0, learning_rate and muon_lr > 0")
    for name in ("beta1", "beta2"):  # (AdamW's own check would be a traceback, after the data is prepared)
        if not 0 <= globals()[name] < 1:
            fail(f"--{name} must be in [0, 1), not {globals()[name]}")
    for name in ("weight_decay", "grad_clip"):
        if globals()[name] < 0:
            fail(f"--{name} must be >= 0 (0: off), not {globals()[name]}")
    if seed < 0:
        fail(f"--seed must be >= 0, not {seed}")
    if ddp_timeout <= 0:
        fail(f"--ddp_timeout must be > 0 seconds, not {ddp_timeout}")
    if max_train_seconds < 0:
        fail(f"--max_train_seconds must be >= 0 (0: no budget), not {max_train_seconds}")
    if compile is not None and not isinstance(compile, bool):
        fail(f"--compile must be True, False or None (on for CUDA only), not {compile!r}")
    if lr_schedule not in ("cosine", "wsd", "constant"):
        fail(f"unknown lr_schedule '{lr_schedule}'; choose cosine, wsd or constant")
    if optimizer not in ("adamw", "muon"):
        fail(f"unknown optimizer '{optimizer}'; choose adamw or muon")
    if init_from not in ("scratch", "resume", "auto"):
        fail(f"unknown init_from '{init_from}'; choose scratch, resume or auto")
    if eval_only and init_from == "scratch":
        fail("--eval_only=True evaluates out_dir/ckpt.pt, not a new model; drop --init_from=scratch")
    try:
        model_args_from_settings()
    except ValueError as e:  # e.g. dim not divisible by n_heads
        fail(str(e))
    if not out_dir.strip():
        fail("--out_dir is empty; name the directory for checkpoints and metrics, e.g. --out_dir=output")
    if wandb_log:
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail("--wandb_log=True needs wandb: `pip install wandb`, or leave --wandb_log=False")


# ---- out_dir: one run at a time, and a fresh start never destroys an earlier run

RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl", "loss.png")
FRESH_START_CHOICES = ("train into another --out_dir, or start afresh here with --init_from=scratch (which first moves "
                       "this run into a run-<time> folder inside out_dir)")
_out_dir_lock = None  # the open out_dir/.lock of this process's run


def _try_lock(f):
    """Lock the open file f for this process: True, or False when another process holds it. The kernel drops the
    lock when the process ends, however it ends (SIGKILL included), so a crashed run never leaves it stuck."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    import msvcrt  # Windows: lock one byte far past the holder's note (locked bytes cannot be read there)
    os.lseek(f.fileno(), 1 << 20, os.SEEK_SET)
    try:
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def claim_out_dir():
    """Create out_dir and hold its lock for as long as this process runs (rank 0 only), or a one-line error: exit
    code 2 when out_dir cannot be written, 1 when another run is using it."""
    global _out_dir_lock
    if _out_dir_lock is not None:  # an earlier train() in this process is over
        _out_dir_lock.close()
        _out_dir_lock = None
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out_dir={out_dir} exists and is not a directory; give another --out_dir")
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, ".lock"), "a+", encoding="utf-8")
    except OSError as e:
        fail(f"cannot write to --out_dir={out_dir} ({e.strerror or e}); give a directory you can write to")
    try:
        locked = _try_lock(f)
    except (OSError, ImportError) as e:  # no locks here (filesystem, platform): run unprotected, not at all
        print(f"warning: cannot lock {out_dir} ({getattr(e, 'strerror', None) or e}); make sure no other run "
              "uses it", file=sys.stderr)
        locked = True
    if not locked:
        f.seek(0)
        holder = f.read().strip() or "another process (starting up)"
        f.close()
        raise SystemExit(f"error: {out_dir} is in use by {holder}; wait for that run to finish or stop it, or use "
                         "another --out_dir")
    try:  # who holds it, for the message a second run prints
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"`python {shlex.join(sys.argv)}`\n")
        f.flush()
    except OSError:  # a full disk: the lock holds all the same
        pass
    _out_dir_lock = f


def release_out_dir():
    """Let the next run have out_dir (dying does the same, minus clearing the note)."""
    global _out_dir_lock
    if _out_dir_lock is not None:
        try:
            _out_dir_lock.truncate(0)
        except OSError:
            pass
        _out_dir_lock.close()
        _out_dir_lock = None


def move_old_run_aside():
    """Before a fresh start: move the files of the run already in out_dir (if any) into out_dir/run-<time of its
    last write>/, so nothing of it is lost. Returns that folder, or None."""
    found = [n for n in RUN_FILES if os.path.lexists(os.path.join(out_dir, n))]
    if not found:
        return None
    last = max(os.lstat(os.path.join(out_dir, n)).st_mtime for n in found)
    base = os.path.join(out_dir, "run-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(last)))
    dest, n = base, 1
    while os.path.lexists(dest):
        dest, n = f"{base}-{n}", n + 1
    os.makedirs(dest)
    for name in found:
        os.replace(os.path.join(out_dir, name), os.path.join(dest, name))
    print(f"starting afresh: the earlier run in {out_dir} ({', '.join(found)}) was moved to {dest}/")
    return dest


# -----------------------------------------------------------------------------
# the run's pieces: processes, resuming, evaluation, checkpoints, metrics and the log

class Processes(NamedTuple):
    """Where this process runs: its rank among world_size processes under torchrun (else 0 of 1), and its device."""
    ddp: bool
    rank: int
    world_size: int
    dev: str

    @property
    def master(self):
        return self.rank == 0


def agree_on_cpu_bf16():
    """Every process takes rank 0's verdict on whether this CPU multiplies bfloat16 fast (fast_bf16_matmul): it picks
    dtype="auto"'s training dtype and Muon's Newton-Schulz precision. Each process timing it for itself could
    disagree near the threshold, and the processes would then train in different dtypes, or (with Muon) their
    replicas' weights would silently drift apart. A collective: every process calls it, before anything asks for
    the verdict. (Rank 0 measures only where the CPU has the instructions; the broadcast runs regardless: processes
    on machines of different CPUs would not agree on skipping it, and one that skipped would leave the rest waiting.)"""
    fast = torch.tensor([fast_bf16_matmul("cpu") if dist.get_rank() == 0 else False])
    dist.broadcast(fast, src=0)
    set_cpu_fast_bf16(fast.item())


def start_processes():
    """This process's rank and device, after checking that the processes share gradient_accumulation_steps evenly;
    under torchrun also the process group (with a bounded timeout), on a CPU rank 0's verdict on bfloat16 for every
    process, and stdout for rank 0 only."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    else:
        rank, local_rank, world_size = 0, 0, 1
    dev = pick_device(device)
    if ddp and dev.startswith("cuda"):
        dev = f"cuda:{local_rank}"
    if dev.startswith("cuda:"):
        torch.cuda.set_device(dev)  # streams, CUDA graphs and Triton kernels run on the current device
    if gradient_accumulation_steps % world_size:
        fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by the number of "
             f"processes ({world_size}); e.g. --gradient_accumulation_steps="
             f"{world_size * max(1, gradient_accumulation_steps // world_size)}")
    if ddp:
        # torch._dynamo (which torch.optim and torch.compile import at first use) imports modules whose functions
        # take dist.group.WORLD as a default argument: imported after init_process_group, they would keep the
        # process group alive past destroy_process_group, and gloo's threads would then free its last tensors
        # while Python shuts down (an abort, exit code -6, in about 1 of 20 runs that had trained to the end).
        # Imported first, those defaults are None. (importlib: an import statement here would make torch a local
        # name of this function)
        importlib.import_module("torch._dynamo")
        # a bounded wait: a collective that a dead or stuck process never joins fails after ddp_timeout seconds
        # (NCCL's watchdog then ends the process) instead of NCCL's or gloo's default of 10-30 minutes
        timeout = datetime.timedelta(seconds=ddp_timeout)
        if dev.startswith("cuda"):
            dist.init_process_group(backend="nccl", device_id=torch.device(dev), timeout=timeout)
        else:
            dist.init_process_group(backend="gloo", timeout=timeout)
            if torch.device(dev).type == "cpu" and (dtype == "auto" or optimizer == "muon"):  # (who reads it)
                agree_on_cpu_bf16()
        if rank != 0:  # one copy of every message: rank 0's (errors and warnings still go to stderr)
            sys.stdout = open(os.devnull, "w")
    return Processes(ddp, rank, world_size, dev)


def batch_stream(split, tokenizer, on, state=None, stream_seed=None):
    """Task.iter_batches with this run's settings: batches of split's token windows, on device on."""
    return Task.iter_batches(split=split, batch_size=batch_size, max_seq_len=max_seq_len, vocab_size=vocab_size,
                             device=on, data_dir=data_dir, seed=seed if stream_seed is None else stream_seed,
                             state=state, tokenizer_sha256=tokenizer.sha256)


def check_resumable(ckpt, path, model_args, tokenizer):
    """A one-line error when the checkpoint cannot continue under these settings (another shape or tokenizer).
    dropout may change: it is a regulariser, not part of the shape (the resumed model takes this run's)."""
    differs = {k: (v, getattr(model_args, k)) for k, v in ckpt["model_args"].items()
               if k != "dropout" and getattr(model_args, k, None) != v}
    if differs:
        detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in differs.items())
        raise SystemExit(f"error: {path} was trained with another model shape ({detail}); "
                         + ("evaluate it with the settings it was trained with" if eval_only else
                            f"resume with the settings it was trained with, or {FRESH_START_CHOICES}"))
    if bytes(ckpt["tokenizer"]) != tokenizer.model_bytes:
        raise SystemExit(f"error: {path} was trained with another tokenizer than {tokenizer.path} (same "
                         "vocab_size, different pieces); "
                         + ("evaluate it on the data it was trained on" if eval_only else
                            f"resume with the data it was trained on, or {FRESH_START_CHOICES}"))


def restore(ckpt, path, optimizers, scaler, procs):
    """Continue where the checkpoint left off: the optimizers' and scaler's state, the random generators (each
    process its own, under the same number of processes), the global max_iters lowered to what a wall-clock budget
    fixed; returns (iter_num, best_val_loss, this process's place in the data, that max_iters or None)."""
    global max_iters
    load_optimizer_states(optimizers, ckpt["optimizer"], path)
    if ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    iter_num, best_val_loss, budget_iters = ckpt["iter_num"], ckpt["best_val_loss"], None
    if max_train_seconds > 0 and ckpt.get("budget_max_iters"):
        if procs.master and not eval_only:
            note_budget_kept(ckpt, path)
        max_iters = min(max_iters, ckpt["budget_max_iters"])  # the same schedule as before the stop
        budget_iters = max_iters
    saved = ckpt["data_state"]
    # with another number of processes every rank continues from rank 0's place in the epoch (the batch stream
    # rescales it and says so)
    same_world = saved["world_size"] == procs.world_size
    data_state = saved["ranks"][procs.rank] if same_world else saved["ranks"][0]
    # each process its own random generators: an exact continuation, dropout masks included. With another number
    # of processes, or from a checkpoint that holds rank 0's alone (older ones), each keeps the seed + rank train()
    # gave it: the global batch is dealt out anew then, so no continuation is exact, and rank 0's state on every
    # rank would give them all the same dropout masks
    rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    if same_world and len(rngs) == procs.world_size:
        set_rng_state(rngs[procs.rank])
    if procs.master:
        print(f"resuming from {path} at iteration {iter_num}")
        if iter_num >= max_iters and not eval_only:
            further = (f"Raise --max_iters to train further, e.g. --max_iters={2 * iter_num}" if budget_iters is None
                       else "Its time budget fixed max_iters, and a resumed run keeps it: to train further, turn the "
                       f"budget off and raise max_iters, e.g. --max_train_seconds=0 --max_iters={2 * iter_num}")
            print(f"note: {path} is already at iteration {iter_num} and max_iters is {max_iters}: nothing to train. "
                  + further, file=sys.stderr)
    return iter_num, best_val_loss, data_state, budget_iters


def tokens_trained(ckpt):
    """The tokens the checkpoint's model was trained on. Checkpoints from before that count was kept: iterations x
    the tokens per iteration of the config they were written with (wrong only where an earlier resume changed it)."""
    if ckpt.get("tokens") is not None:
        return ckpt["tokens"]
    config = ckpt.get("config", {})
    return ckpt["iter_num"] * math.prod(config.get(k, globals()[k]) for k in ("gradient_accumulation_steps",
                                                                               "batch_size", "max_seq_len"))


def note_budget_kept(ckpt, path):
    """A resumed run keeps the max_iters its time budget fixed (the same schedule as before the stop, so the resume
    is exact): a note naming the --max_iters and --max_train_seconds this run was given for another schedule, which
    it therefore does not use, and what does work. (A max_iters below the budget's does lower it.)"""
    fixed, before = ckpt["budget_max_iters"], ckpt.get("config", {})
    other_iters = max_iters > fixed and max_iters != before.get("max_iters")  # (not the cap the run had before)
    unused = [f"--max_iters={max_iters}"] if other_iters else []
    if max_train_seconds != before.get("max_train_seconds"):
        unused.append(f"--max_train_seconds={max_train_seconds:g}")
    if unused:
        print(f"note: {' and '.join(unused)} not used: {path}'s time budget fixed max_iters at {fixed}, and a resumed "
              "run keeps that schedule. To train to another max_iters, turn the budget off: --max_train_seconds=0 "
              f"--max_iters={max_iters if other_iters else 2 * fixed}", file=sys.stderr)


def note_eval_windows(tokenizer, procs):
    """A note when an evaluation would read some windows of a split more than once."""
    for split in ("train", "val"):
        windows, wanted = batch_stream(split, tokenizer, procs.dev).windows_per_epoch, eval_iters * batch_size
        if wanted > windows:
            print(f"note: an evaluation reads eval_iters x batch_size = {wanted} windows of {max_seq_len + 1} "
                  f"tokens, but the {split} split holds only {windows}" + (" per process" if procs.ddp else "") +
                  f": some are counted more than once. --eval_iters={max(1, windows // batch_size)} reads each at "
                  "most once", file=sys.stderr)


def compile_model(model, dev):
    """Regional compilation (model.compile_regions) when compile is on (None: on CUDA only); whether it is."""
    if not (compile if compile is not None else dev.startswith("cuda")):
        return False
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2, device=dev))  # fails fast without a working toolchain
        model.compile_regions()
    except Exception as e:
        print(f"torch.compile unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); running without it")
        return False
    return True


@torch.no_grad()
def evaluate(model, tokenizer, ctx, procs):
    """Mean loss on eval_iters batches of each split (the same batches every time), over all processes.

    Uncompiled: a forward pass without gradients is another graph for torch.compile; compiling it cost 5.5 s of a
    cold start on an H200 (seed shape), for evaluations that take well under a second each eager."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        stream = batch_stream(split, tokenizer, procs.dev, stream_seed=seed + 1)
        total = torch.zeros((), device=procs.dev)
        for _ in range(eval_iters):
            x, y = next(stream)
            with ctx, torch.compiler.set_stance("force_eager"):
                model(x, y, return_logits=False)
            total += model.last_loss.float()
        if procs.ddp:
            dist.all_reduce(total)
        out[split] = total.item() / (eval_iters * procs.world_size)
    model.train()
    return out


class Checkpoints:
    """Writes ckpt.pt (and best.pt): the model, the optimizers and everything a bitwise resume needs. What is fixed
    for the run is given once; the state that changes as training goes is passed to write()."""

    def __init__(self, model, model_args, optimizers, scaler, tokenizer, config, procs, precision, tokens_at):
        self.model, self.model_args, self.optimizers, self.scaler = model, model_args, optimizers, scaler
        self.tokenizer, self.config, self.procs, self.precision = tokenizer, config, procs, precision
        self.tokens_at = tokens_at  # iteration -> tokens trained on by then

    def write(self, paths, iter_num, best_val_loss, budget_iters, data_state):
        """The state at iteration iter_num, to each of paths (built and gathered once); data_state: this process's
        place in the training stream (every process's is gathered, with its random generators)."""
        mine = (data_state, rng_state())
        states = [mine]
        if self.procs.ddp:
            states = [None] * self.procs.world_size
            dist.all_gather_object(states, mine)
        if not self.procs.master:
            return
        data_states, rngs = (list(per_rank) for per_rank in zip(*states))
        ckpt = checkpoint_dict(self.model, self.model_args, optimizer=[optimizer_state(o) for o in self.optimizers],
                               scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                               iter_num=iter_num, best_val_loss=best_val_loss, config=self.config, rng=rngs,
                               data_state={"world_size": self.procs.world_size, "ranks": data_states},
                               tokenizer=self.tokenizer.model_bytes, budget_max_iters=budget_iters,
                               precision=self.precision, tokens=self.tokens_at(iter_num))
        for path in paths:
            save_checkpoint(ckpt, path)


class Metrics:
    """out_dir/metrics.jsonl (and wandb when on): one JSON record per log line and per evaluation, written by rank
    0. history: the records so far, a resumed run's earlier ones included (for the plot and the summary)."""

    def __init__(self, resuming, resume_iter, config):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.history = metrics_history(self.path, resume_iter) if resuming else []
        try:
            if not resuming:
                move_old_run_aside()  # nothing of an earlier run is lost or mixed into this one
            # a resumed run drops what a cut-off run logged after its last checkpoint
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.history).encode())
        except OSError as e:
            raise SystemExit(f"error: cannot write in {out_dir} ({e.strerror or e}); free some disk space or fix "
                             "the folder, then run the same command again") from None
        self.wandb = None
        if wandb_log:
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=config, resume="allow")
            self.wandb = wandb

    def record(self, entry):
        self.history.append(entry)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self.wandb is not None:
            self.wandb.log(entry, step=entry["iter"])


class LogLines:
    """The log line of each log iteration: loss, lr, gradient norm, ms per iteration since the last line, tokens/s,
    MFU and the time left. Lines are timed by when the loop reads the step's results, which is when the step ended;
    evaluations and checkpoints do not count (pause()). metrics: rank 0's Metrics, None on the other ranks."""

    def __init__(self, model, tokens_per_iter, rows_per_iter, resume_iter, metrics, tokens_at):
        self.model, self.tokens_per_iter, self.rows_per_iter = model, tokens_per_iter, rows_per_iter
        self.resume_iter, self.metrics, self.tokens_at = resume_iter, metrics, tokens_at
        self.t_last, self.ms_per_iter = time.time(), None
        self.logged_at = resume_iter  # the iteration of the last line

    def pause(self, seconds):
        self.t_last += seconds

    def line(self, it, r):
        """Iteration it's results r (STATS and lr)."""
        elapsed = time.time() - self.t_last
        self.t_last, ms = time.time(), elapsed / (it - self.logged_at) * 1000
        self.logged_at = it
        first_estimate = self.ms_per_iter is None
        if it - self.resume_iter > 2:  # skip the first steps (compile, allocator warm-up) in the averages
            self.ms_per_iter = ms if self.ms_per_iter is None else 0.9 * self.ms_per_iter + 0.1 * ms
        if self.metrics is None:
            return
        if first_estimate and self.ms_per_iter is not None:
            print(f"estimated training time: {(max_iters - it) * self.ms_per_iter / 60000:.1f} min for the "
                  f"remaining {max_iters - it} iterations at {self.ms_per_iter:.0f} ms each (plus evaluations)")
        mfu = self.model.estimate_mfu(self.rows_per_iter, ms / 1000, peak_flops or None)
        lr, tok_per_s, n_skipped = r["lr"], self.tokens_per_iter / ms * 1000, int(r["skipped"])
        eta = (max_iters - it) * (self.ms_per_iter or ms) / 1000
        print(f"iter {it}/{max_iters} | loss {r['loss']:.4f} | lr {lr:.2e} | norm {r['grad_norm']:.2f} | "
              f"{ms:.1f} ms | {tok_per_s:,.0f} tok/s" + (f" | mfu {mfu * 100:.1f}%" if not math.isnan(mfu) else "")
              + (f" | {n_skipped} non-finite steps skipped" if n_skipped else "") + f" | eta {eta / 60:.1f} min",
              flush=True)
        self.metrics.record({"iter": it, "tokens": self.tokens_at(it), "loss": r["loss"], "lr": lr,
                             "grad_norm": r["grad_norm"], "ms": ms, "tok_per_s": tok_per_s,
                             "mfu": None if math.isnan(mfu) else mfu, "skipped": n_skipped})


def stop_if_diverging(it, r, saved_iter, ckpt_path):
    """max_bad_steps consecutive non-finite steps (r: iteration it's results): stop with a one-line error."""
    if r["bad_steps"] < max_bad_steps:
        return
    held = (f"{ckpt_path} holds iteration {saved_iter} (skipped steps change no weights)" if saved_iter is not None
            else f"no checkpoint was written (the first was due at iteration {eval_interval})")
    raise SystemExit(f"error: {int(r['bad_steps'])} consecutive steps with a non-finite loss or gradient at iteration "
                     f"{it} ({int(r['skipped'])} skipped in all); {held}. Lower learning_rate, or use dtype=bfloat16 "
                     "instead of float16")


def print_summary(history, iter_num, ckpt_path, metrics_path):
    """The end of a run that trained to max_iters: the best evaluation, where the files are, what to run next."""
    evals = [r for r in history if "val_bpb" in r]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    print(f"done: {iter_num} iterations" + (f"; best val loss {best['val_loss']:.4f} ({best['val_bpb']:.4f} "
                                             f"bits/byte) at iteration {best['iter']}" if best else ""))
    best_path, plot_path = os.path.join(out_dir, "best.pt"), os.path.join(out_dir, "loss.png")
    if os.path.exists(ckpt_path):
        print(f"checkpoint: {ckpt_path}" + (f" (lowest val loss: {best_path})" if os.path.exists(best_path) else "")
              + f"; metrics: {metrics_path}" + (f"; plot: {plot_path}" if os.path.exists(plot_path) else ""))
        print(f"next: python sample.py --ckpt {ckpt_path}")


# -----------------------------------------------------------------------------
# the run: set up, then data -> step -> log until max_iters, with evaluations and checkpoints on the way

def train():
    global max_iters  # a wall-clock budget (max_train_seconds) fixes it once the first steps are timed
    check_settings()
    config = {k: globals()[k] for k in settings_of(globals())}

    # ---- processes, device, precision, out_dir
    procs = start_processes()
    ddp, master, dev, world_size = procs.ddp, procs.master, procs.dev, procs.world_size
    device_type = torch.device(dev).type
    dtype_name = pick_dtype(dtype, dev, training=True)
    dtype_why = (" (auto: this CPU multiplies bfloat16 fast; --dtype=float32 to train in float32)"
                 if device_type == "cpu" and dtype == "auto" and dtype_name == "bfloat16" else "")
    accum = gradient_accumulation_steps // world_size
    tokens_per_iter = gradient_accumulation_steps * batch_size * max_seq_len
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if eval_only and not os.path.exists(ckpt_path):  # a random model's loss would be no answer
        raise SystemExit(f"error: --eval_only=True evaluates {ckpt_path}, which does not exist; point --out_dir at "
                         "the folder of a trained run")
    if init_from == "resume" and not os.path.exists(ckpt_path):
        raise SystemExit(f"error: init_from='resume' but {ckpt_path} does not exist; use --init_from=auto or scratch")
    if master and not eval_only:  # (eval_only writes nothing in out_dir, so it may run beside the run training there)
        claim_out_dir()  # before any work: a second run on this out_dir stops here
    torch.manual_seed(seed + procs.rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- data and tokenizer
    ensure_data(master)
    if ddp:
        dist.barrier()
    tokenizer = Tokenizer(os.path.join(data_dir, f"tok{vocab_size}.model"))
    meta = load_meta(data_dir, vocab_size)
    tokens_per_byte = meta["splits"]["val"]["tokens"] / meta["splits"]["val"]["bytes"]

    # ---- model and optimizer, fresh or from out_dir/ckpt.pt
    model_args = model_args_from_settings()
    resuming = init_from == "resume" or (init_from == "auto" and os.path.exists(ckpt_path))
    ckpt = load_checkpoint(ckpt_path) if resuming else None  # on the CPU; load_state_dict moves to the device
    if ckpt is not None:
        check_resumable(ckpt, ckpt_path, model_args, tokenizer)
        if dtype == "auto" and ckpt.get("precision", {}).get("device_type") == device_type:
            dtype_name = ckpt["precision"]["dtype"]  # what "auto" chose then (on a CPU a measurement): bitwise resume
            dtype_why = " (auto: as the checkpoint was trained)"
    model = (Transformer.from_checkpoint(ckpt, ckpt_path, dropout=dropout) if ckpt is not None
             else Transformer(model_args))
    model.to(dev)
    optimizers = build_optimizers(model, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype_name == "float16")
    iter_num, best_val_loss, data_state, budget_iters = (restore(ckpt, ckpt_path, optimizers, scaler, procs)
                                                         if ckpt is not None else (0, float("inf"), None, None))
    # the tokens trained on by iteration it count on from the checkpoint's total: the runs before this one may have
    # taken other numbers of tokens per iteration
    tokens_before = tokens_trained(ckpt) if ckpt is not None else 0
    del ckpt
    resume_iter = iter_num

    def tokens_at(it):
        return tokens_before + (it - resume_iter) * tokens_per_iter

    if master:
        note_eval_windows(tokenizer, procs)

    # ---- the step: compiled blocks, gradients summed over the processes, the Stepper
    use_compile = compile_model(model, dev)
    grads = None
    if ddp:
        # data parallel: every process starts from rank 0's weights (each drew its own with seed + rank) and takes
        # the same step from gradients summed over all of them (GradBuffer; no DDP wrapper, so the step, the
        # all_reduce included, can be captured as one CUDA graph)
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
        grads = GradBuffer(model.parameters(), world_size)
    ctx = autocast_ctx(dev, dtype_name)  # evaluation's
    stepper, step_line = make_stepper(model, optimizers, scaler, accum, batch_size, max_seq_len, dev, dtype_name,
                                      grad_clip, grads, cuda_graph)
    train_batches = batch_stream("train", tokenizer, "cpu", state=data_state)  # the stepper copies them over

    # ---- checkpoints, metrics, the banner
    checkpoints = Checkpoints(model, model_args, optimizers, scaler, tokenizer, config, procs,
                              precision={"device_type": device_type, "dtype": dtype_name}, tokens_at=tokens_at)
    metrics = Metrics(resuming, resume_iter, config) if master and not eval_only else None
    if master:
        n = model.num_params()
        print(f"model: {n / 1e6:.2f}M parameters ({model.num_params(non_embedding=True) / 1e6:.2f}M without "
              f"embeddings), {n_layers} layers, dim {dim}, {n_heads} heads ({n_kv_heads} kv), "
              f"context {max_seq_len}, vocab {vocab_size}")
        print(f"data: {meta['splits']['train']['tokens']:,} train / {meta['splits']['val']['tokens']:,} val "
              f"tokens in {data_dir}/tok{vocab_size}")
        print(f"device {dev}, dtype {dtype_name}{dtype_why}, {world_size} process(es), compile {use_compile}"
              + (" (each block once)" if use_compile else ""))
        print(f"tokens per iteration: {tokens_per_iter:,} = {gradient_accumulation_steps} accumulation x "
              f"{batch_size} batch x {max_seq_len} tokens (over {world_size} processes)")
        print(step_line)

    # ---- the training loop
    stop = StopRequest()
    train_batches_state = train_batches.state_dict()  # the state that yields the next batch
    results = Results(stepper, stepper.capture, ddp, ddp_timeout)
    log = LogLines(model, tokens_per_iter, batch_size * accum, resume_iter, metrics, tokens_at)
    stopped = False
    saved_iter = resume_iter if resuming else None  # the iteration out_dir/ckpt.pt holds
    # the last evaluation's iteration: a resumed run does not repeat the one its checkpoint was written after
    evaluated_at = resume_iter if resuming else None
    stop_agreed = False  # under torchrun: a process asked to stop (read at a log iteration)
    warm_iter = resume_iter + (Stepper.warmup_steps + 1 if stepper.capture else 0)  # compiled and captured
    budget = Budget(max_train_seconds, device_type, warm_iter) if max_train_seconds > 0 and budget_iters is None \
        else None
    while True:
        last = iter_num >= max_iters
        evaluate_now = eval_only or ((iter_num % eval_interval == 0 or last) and iter_num != evaluated_at)
        stop_now = stop_agreed if ddp else stop.requested()  # (all processes stop at the same iteration)
        step_now = not (evaluate_now or last or stop_now)
        if step_now:
            # data -> step -> log: the step runs on the device while the host fetches the next batches
            lr = lr_at(iter_num)  # this step's (a wall-clock budget may refit the schedule below)
            set_lr(optimizers, iter_num)
            stepper.load(*zip(*(next(train_batches) for _ in range(accum))))
            train_batches_state = train_batches.state_dict()
            stepper()
            iter_num += 1
            if iter_num == resume_iter + 1 and master:
                stepper.stats["loss"].item()  # wait for the first step (compilation included)
                print(f"first step done {time.time() - PROCESS_START:.1f} s after start", flush=True)
            if budget is not None:
                stepper.wait(ddp_timeout)  # the budget times the steps: it waits for each anyway
                if budget.timed(iter_num, ddp, dev):
                    max_iters = budget_iters = budget.fit(iter_num, model, optimizers, ddp, dev, master)
                    budget = None
            logging = iter_num % log_interval == 0 or iter_num == max_iters
            # max_bad_steps: the count lives on the device; read it with the logs, on the CPU (where that costs
            # nothing) after every step, else every max_bad_steps iterations too: with a captured step, read one
            # step late, at most 2 x max_bad_steps non-finite steps are taken (each skipped) before the stop
            if logging or device_type == "cpu" or iter_num % max_bad_steps == 0:
                results.take(iter_num, logging, lr, stop.requested())

        # the results taken at earlier iterations: with a captured step, the one just launched runs while they
        # are read (not while a budget times the steps: it waits for each, and the lines are timed by the reads)
        for it, logged, r, agreed in results.ready(everything=not step_now or budget is not None):
            stop_agreed = stop_agreed or agreed
            stop_if_diverging(it, r, saved_iter, ckpt_path)
            if logged:
                log.line(it, r)
        if step_now:
            continue

        if evaluate_now:
            t_eval = time.time()
            losses = evaluate(model, tokenizer, ctx, procs)
            val_bpb = losses["val"] * tokens_per_byte / math.log(2)
            if master:
                print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                      f"val {val_bpb:.4f} bits/byte")
            if master and not eval_only:  # eval_only reports; the run's metrics and plot are its training's
                metrics.record({"iter": iter_num, "tokens": tokens_at(iter_num), "train_loss": losses["train"],
                                "val_loss": losses["val"], "val_bpb": val_bpb})
                plot_losses(metrics.history, os.path.join(out_dir, "loss.png"))
            improved = losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val"])
            if iter_num > 0 and not eval_only:
                # best.pt first: killed between the two writes, ckpt.pt must not be left with a best_val_loss that
                # best.pt does not hold (later evaluations between the two losses would then never update best.pt)
                paths = ([os.path.join(out_dir, "best.pt")] if improved and keep_best else []) + [ckpt_path]
                checkpoints.write(paths, iter_num, best_val_loss, budget_iters, train_batches_state)
                saved_iter = iter_num
            evaluated_at = iter_num
            log.pause(time.time() - t_eval)  # evaluation and checkpointing are not training time
            if budget is not None:
                budget.eval_seconds = max(budget.eval_seconds, time.time() - t_eval)
        if last or eval_only:
            break
        if stop_now:
            stopped = True
            if iter_num > resume_iter:
                checkpoints.write([ckpt_path], iter_num, best_val_loss, budget_iters, train_batches_state)
            if master and os.path.exists(ckpt_path):
                print(f"stopped at iteration {iter_num}; {ckpt_path} holds it. Resume with the same command "
                      "(init_from='auto' continues from it).")
            elif master:
                print(f"stopped at iteration {iter_num}, before there was anything to save")
            break

    if master and not eval_only and not stopped:
        print_summary(metrics.history, iter_num, ckpt_path, metrics.path)
    if ddp:
        stepper.graph = None  # a graph that holds a captured NCCL collective can hang the teardown (PyTorch #115388)
        dist.barrier()  # tear down together: gloo aborts a process whose peer has already closed its connections
        dist.destroy_process_group()
    release_out_dir()


def out_of_memory(error):
    """Whether error is an allocation that failed: CUDA's torch.OutOfMemoryError, or the RuntimeError the CPU's
    (or MPS's) allocator raises."""
    return isinstance(error, torch.OutOfMemoryError) or any(
        words in str(error) for words in ("out of memory", "can't allocate memory"))


def first_line(error):
    """The gist of an exception's message, for a one-line error."""
    return str(error).splitlines()[0].split(". ")[0][:200] if str(error) else type(error).__name__


def last_checkpoint():
    ckpt = os.path.join(out_dir, "ckpt.pt")
    return f"{ckpt} holds the last checkpoint" if os.path.exists(ckpt) else "no checkpoint was written yet"


if __name__ == "__main__":
    sys.stdout, sys.stderr = (DropWhenUnread(s) if s is not None else s for s in (sys.stdout, sys.stderr))
    configure(globals(), sys.argv[1:])
    try:
        train()
    except KeyboardInterrupt:  # before the loop's own handler is in place (data preparation, compilation)
        print("\ninterrupted before training started; nothing was saved", file=sys.stderr)
        sys.exit(130)
    except (dist.DistError, RuntimeError) as e:
        if out_of_memory(e):  # this process's own failure (under torchrun too: no other process was lost)
            rank = f"rank {dist.get_rank()}: " if dist.is_initialized() else ""
            cause = next((part for part in re.split(r"\. |: ", str(e)) if "memory" in part), first_line(e))
            raise SystemExit(f"error: {rank}out of memory ({cause}); lower --batch_size and raise "
                             "--gradient_accumulation_steps by the same factor (the same tokens per iteration), or "
                             f"shorten --max_seq_len (a new model: a new --out_dir). {last_checkpoint()}") from None
        if not dist.is_initialized() or dist.get_world_size() < 2:
            raise
        # a collective failed: another process died (its connection closed) or hung past ddp_timeout
        raise SystemExit(f"error: rank {dist.get_rank()}: lost the other processes ({first_line(e)}); stopping. "
                         f"{last_checkpoint()}; find why a process died or hung (its own messages above), then run "
                         "the same torchrun command again to resume") from None
