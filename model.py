"""
The tinyllm model: a Llama-style Transformer, readable top to bottom.

    from model import Transformer, ModelArgs
    model = Transformer(ModelArgs(dim=288, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=4096))
    logits = model(tokens, targets)      # model.last_loss holds the mean cross entropy
    out = model.generate(prompt, 100, temperature=0.8, top_k=200)

Pieces: RMSNorm, rotary position embeddings (RoPE), grouped-query attention through PyTorch's
scaled_dot_product_attention, a SwiGLU feed-forward, tied input/output embeddings, and a KV cache for generation.
Below the model live the few helpers every script shares: device/dtype selection, checkpoint save/load, and
load_model (a checkpoint's model and tokenizer, for sample.py and export.py).
"""

import math
import os
import pickle
import sys
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass, asdict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # the GPU's cross-entropy kernel (Triton comes with PyTorch's CUDA builds; CPU-only installs do without)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from configurator import fail
from preprocess import Tokenizer, atomic_write


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None: same as n_heads (plain multi-head attention)
    vocab_size: int = 4096
    hidden_dim: Optional[int] = None  # None: derived from dim and multiple_of, as in Llama
    multiple_of: int = 32
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            # Llama's recipe: 4*dim, then 2/3 of that (SwiGLU has three matrices, not two), rounded up
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        problems = []
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of",
                     "max_seq_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not problems:
            if self.dim % self.n_heads:
                problems.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            elif (self.dim // self.n_heads) % 2:
                problems.append(f"head size dim/n_heads ({self.dim // self.n_heads}) must be even for rotary "
                                "embeddings")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            problems.append("norm_eps and rope_theta must be > 0")
        if problems:
            raise ValueError("invalid model shape: " + "; ".join(problems))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, add=None):
        if add is not None:  # the residual stream's last add, made here so that it fuses with the norm
            x = x + add
        # normalise in fp32: squaring bf16/fp16 activations loses too much precision
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float):
    """cos/sin of position * frequency, shape (max_seq_len, head_dim // 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[2i], x[2i+1]) of the last dim by its position's angle (Meta's interleaved layout).

    x: (B, T, n_heads, head_dim), as the projection writes it (rotating before the heads are transposed reads
    and writes memory in order); cos, sin: (T, head_dim // 2).
    Written as x * cos + swapped pairs * (-sin, sin) rather than by stacking the two halves of the rotation:
    the same products and sums, but inductor's kernel reads and writes whole rows (on an H200 the forward kernel
    at the stories110M shape takes 0.19 ms instead of 0.27, and the stories15M step 0.4 ms less).
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (..., pairs, 2)
    cos = cos[:, None, :, None]  # the same angle for every head and both members of a pair
    sin = torch.stack((-sin, sin), dim=-1)[:, None]
    return (xf * cos + xf.flip(-1) * sin).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

        grouped = self.n_kv_heads != self.n_heads
        pad = 0
        if cache is None:
            is_causal = True
            # CUDA's fast attention kernels (cuDNN, memory-efficient) need a head size divisible by 8: zero
            # columns added to q, k and v change no dot product, and the output's extra columns are dropped
            # (at dim 288 with 8 heads, size 36 -> 40 takes cuDNN instead of a slower flash path)
            pad = -self.head_dim % 8 if x.is_cuda else 0
            if pad:
                q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        else:
            # generation: store this step's keys/values and attend over everything cached so far
            k_cache, v_cache = cache
            k_cache[:, :, start_pos:start_pos + T] = k
            v_cache[:, :, start_pos:start_pos + T] = v
            k, v = k_cache[:, :, :start_pos + T], v_cache[:, :, :start_pos + T]
            # a single new query may see every cached position; a prompt starting at 0 is plain causal
            assert T == 1 or start_pos == 0, "the cache is filled by one prompt, then one token at a time"
            is_causal = T > 1
        # each group of n_heads // n_kv_heads query heads shares one key/value head: SDPA reads them in place
        # (enable_gqa: CPU's flash kernel and CUDA's flash and cuDNN kernels take it; measured on an H200 it is
        # faster than repeat_interleave copies of k and v), and so does the cache path
        extra = ({"enable_gqa": True} if grouped else {}) | ({"scale": 1 / math.sqrt(self.head_dim)} if pad else {})
        cpu_bf16 = x.device.type == "cpu" and q.dtype == torch.bfloat16
        if cpu_bf16:
            # the CPU's flash attention runs its backward pass in bfloat16 ~1.9x slower than in float32 (tiny's
            # shape; autocast would cast float32 inputs back down, so it is off here): the matmuls around it
            # keep their bfloat16 speed
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if cpu_bf16 else nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                               dropout_p=self.dropout if self.training else 0.0, **extra)
        if cpu_bf16:
            y = y.bfloat16()
        if pad:
            y = y[..., :self.head_dim]
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, ffn_out, cos, sin, cache=None, start_pos=0):
        """x + ffn_out (the previous block's FFN output; None in the first block) is the residual stream that
        enters this block. Returns the stream after this block's attention, and this block's FFN output, which
        the next block (or the final norm) adds: inside a compiled block that add fuses with the norm reading
        the sum, one pass over the float32 stream less per block (on an H200, 1.5% of the stories15M step and
        1.7% of stories110M's). The forward pass makes the same sums in the same order as adding attention and FFN
        at the end of each block; compiled, the backward pass fuses differently (gradients agree to rounding)."""
        if ffn_out is not None:
            x = x + ffn_out
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos)
        return x, self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    last_loss: Optional[torch.Tensor]

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied: one matrix reads and writes tokens

        # derived from the args, so not saved in checkpoints (persistent=False)
        cos, sin = rope_tables(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.apply(self._init_weights)
        # GPT-2's scaled init for the projections that write into the residual stream, so its variance
        # does not grow with depth (llama2.c scales w3 instead of w2: its issue #579)
        for name, p in self.named_parameters():
            if name.endswith("attention.wo.weight") or name.endswith("feed_forward.w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))
        self.last_loss = None
        self.xent = xent_chunk  # compile_regions() swaps in a faster kernel

    def compile_regions(self):
        """Regional compilation: each TransformerBlock and the final norm through torch.compile, plus the loss's
        per-chunk kernel (on CUDA, xent_rows: a hand-written kernel, faster than what inductor makes of xent_chunk).

        The blocks share one piece of code, so it is compiled once and reused by every layer (with the weights as
        inputs; the first block, with no FFN output before it to add, gets a graph of its own): a cold start
        compiles two blocks instead of the whole unrolled model, and the inductor cache (in
        its default place) makes the next start warm. Shapes are static: a new batch shape gets its own kernels.
        Inductor's default benchmarks several launch configurations of every elementwise kernel at its first run:
        off, a cold start of the seed shape on an H200 took 15.0 s to its first step instead of 21.7, and its
        steps took as long (13.9 ms).
        """
        options = {"triton.autotune_pointwise": False}
        if torch.__version__ < "2.13":  # (a TorchVersion: compares as a version, 2.13 pre-releases included)
            # Before 2.13 PyTorch's on-disk AOTAutograd cache tells runs apart by whether autocast is on, not by
            # its dtype (fixed by pytorch/pytorch#181564): a bfloat16 run after a float16 one (or the reverse)
            # loaded the other's compiled blocks and silently trained in the wrong precision (H200, torch 2.11:
            # stories15M's loss stalled at 7.05 where it reaches 6.05). Off; inductor's own cache, keyed on the
            # graph with its casts, still spares a warm start the code generation.
            from torch._functorch import config as aot_autograd_config
            aot_autograd_config.enable_autograd_cache = False
            if aot_autograd_config.enable_autograd_cache:  # TORCHINDUCTOR_AUTOGRAD_CACHE=1 overrides the line above
                print("warning: TORCHINDUCTOR_AUTOGRAD_CACHE=1 keeps PyTorch's AOTAutograd cache on; before torch "
                      "2.13 it can hand a bfloat16 run a float16 run's compiled blocks (or the reverse): unset it",
                      file=sys.stderr)
        for layer in self.layers:
            layer.compile(dynamic=False, options=options)
        self.norm.compile(dynamic=False, options=options)  # left eager: several float32 ops, 1-2.5% of a step
        if triton is not None and self.output.weight.is_cuda:
            self.xent = xent_rows
        else:
            self.xent = torch.compile(xent_chunk, dynamic=False, options=options)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, targets=None, cache=None, start_pos=0, return_logits=True):
        """Logits for every position when targets are given (and self.last_loss), else for the last one only.

        return_logits=False (training, evaluation): only self.last_loss, through linear_cross_entropy, which never
        holds the (tokens x vocab) logits whole; returns None.
        cache/start_pos are for generate(): a list of per-layer (k, v) buffers and the position of tokens[:, 0].
        """
        T = tokens.shape[1]
        if start_pos + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len {self.args.max_seq_len}")
        h = self.dropout(self.tok_embeddings(tokens))
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        ffn_out = None
        for i, layer in enumerate(self.layers):
            h, ffn_out = layer(h, ffn_out, cos, sin, None if cache is None else cache[i], start_pos)
        h = self.norm(h, ffn_out)

        if targets is not None and not return_logits and (
                self.xent is not xent_chunk or h.numel() // h.shape[-1] * self.args.vocab_size > LOGITS_PER_CHUNK):
            self.last_loss = linear_cross_entropy(h, self.output.weight, targets, self.xent)
            return None
        if targets is not None:
            # small logits and no compiler (the CPU): the whole matrix through the fused cross entropy is faster
            # than the chunked path's eager elementwise ops (~20% of a tiny model's step)
            logits = self.output(h)
            self.last_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=-1)
            return logits if return_logits else None
        else:
            logits = self.output(h[:, [-1], :])  # inference needs only the last position: skip T-1 matmuls
            self.last_loss = None
        return logits

    def num_params(self, non_embedding=False):
        """Parameter count (the tied embedding/output matrix counted once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if non_embedding else n

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay only on matrices (>= 2-D), never on norms' gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        print(f"decayed tensors: {len(decay)} ({sum(p.numel() for p in decay):,} parameters); "
              f"not decayed: {len(no_decay)} ({sum(p.numel() for p in no_decay):,} parameters)")
        return adamw(groups, learning_rate, betas, device_type)

    def estimate_mfu(self, fwdbwd_per_iter, seconds, peak_flops=None):
        """Model FLOPs utilisation: achieved FLOP/s over the device's peak dense bf16 FLOP/s.

        FLOPs per token are 6N + 12*L*H*Q*T (PaLM, appendix B). The peak comes from peak_flops when given, else
        from PEAK_BF16_FLOPS by the CUDA device's name. Returns NaN when the peak is unknown (CPU, MPS, a GPU not
        in the table), so callers print no MFU rather than a wrong one.
        """
        peak = peak_flops or device_peak_flops()
        if not peak or seconds <= 0:
            return float("nan")
        a = self.args
        L, H, Q, T = a.n_layers, a.n_heads, a.dim // a.n_heads, a.max_seq_len
        flops_per_token = 6 * self.num_params() + 12 * L * H * Q * T
        return flops_per_token * T * fwdbwd_per_iter / seconds / peak

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 use_cache=True, cuda_graph=True):
        """Continue the token sequences idx (B, T) by up to max_new_tokens; returns (B, T + new).

        temperature 0 is greedy. top_k keeps the k likeliest tokens, top_p the smallest set whose probability
        reaches p. Generation stops once every row has produced eos_id (finished rows are padded with it).
        The context is a window of at most max_seq_len tokens: when it fills up it slides to keep the latest
        half, so with the cache one re-prefill happens every max_seq_len/2 tokens. Both paths slide the same
        way, so use_cache=False gives the same tokens, only slower. On CUDA the cached path replays one captured
        CUDA graph per token (see Decoder); cuda_graph=False runs the same step uncaptured.
        """
        steps = self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, cuda_graph)
        # concatenated outside inference mode, so the result is an ordinary tensor callers may feed to training
        new = [next_id[:, None] for next_id in steps]
        return torch.cat([idx] + ([torch.cat(new, dim=1).to(idx.device)] if new else []), dim=1)

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                        use_cache=True, cuda_graph=True):
        """generate() one step at a time: yields each new token column, a LongTensor (B,) on the CPU, as it is
        sampled (read it there: .tolist(); a GPU is already computing the next one meanwhile, see below).

        inference_mode rather than no_grad: it also skips autograd's view and version bookkeeping, a measurable
        share of a step on CPU, where a small model's step is mostly per-op overhead. The yielded tensors are
        inference tensors: read them (.tolist()), or clone them before using them in autograd.
        """
        L = self.args.max_seq_len
        B, device = idx.shape[0], idx.device
        # on CUDA the device runs ahead of the host: right after step t, the token goes to the host by a copy that
        # does not wait for anything queued later, and step t+1 is queued at once (a step needs nothing from the
        # host: it feeds itself its last token), so the device computes the next token while the host waits for
        # this one and does its own per-token work (the graph launch, the reader's printing), not one after the
        # other. The tokens so far stay on the host: only a prefill sends them to the device.
        copied = torch.cuda.Event() if device.type == "cuda" else None  # marks this step's token on the host
        tokens = idx.cpu()
        start = max(0, tokens.shape[1] - L)  # first token of the context window
        decoder, filled = None, False     # filled: the cache holds the window up to the newest token but one
        queued = None  # the next step's token, when already queued on the device
        finished = torch.zeros(B, dtype=torch.bool)
        for i in range(max_new_tokens):
            if tokens.shape[1] - start > L:
                start, filled = tokens.shape[1] - L // 2, False
            if not use_cache:
                next_id = sample_next(self(tokens[:, start:].to(device))[:, -1, :].float(), temperature, top_k, top_p)
            else:
                if decoder is None:
                    decoder = Decoder(self, B, temperature, top_k, top_p, cuda_graph)
                if not filled:
                    next_id = decoder.prefill(tokens[:, start:].to(device))
                else:
                    next_id = queued if queued is not None else decoder.step()
                filled, queued = True, None
            if copied is None:
                next_id = next_id.cpu()
            else:
                host = torch.empty(B, dtype=torch.long, pin_memory=True).copy_(next_id, non_blocking=True)
                copied.record(torch.cuda.current_stream(device))
                if use_cache and i + 1 < max_new_tokens and tokens.shape[1] + 1 - start <= L:  # a step comes next
                    queued = decoder.step()
                copied.synchronize()
                next_id = host
            if eos_id is not None:
                next_id = torch.where(finished, torch.full_like(next_id, eos_id), next_id)
                finished |= next_id == eos_id
            tokens = torch.cat((tokens, next_id[:, None]), dim=1)
            yield next_id
            if eos_id is not None and finished.all():
                return

    @classmethod
    def from_checkpoint(cls, ckpt, path="the checkpoint", **changes):
        """Build the model a checkpoint describes and load its weights (every key must match), or a one-line error.
        changes: ModelArgs that the weights do not depend on, to differ from the checkpoint's (train.py: dropout)."""
        try:
            model = cls(ModelArgs(**{**ckpt["model_args"], **changes}))
            model.load_state_dict(ckpt["model"], strict=True)
        except (RuntimeError, ValueError, TypeError, KeyError) as e:
            detail = " ".join(str(e).split())  # load_state_dict names the keys over several lines
            raise SystemExit(f"error: {path}: its weights do not fit its model_args ({detail[:300]}); the file is "
                             "damaged or was not written by this version of tinyllm") from None
        return model


# -----------------------------------------------------------------------------
# the LM head and cross entropy, chunk by chunk: at vocab 32000 the (tokens x vocab) logits of a batch are larger
# than the rest of the activations together, so they are never formed whole

def xent_chunk(logits, targets, need_grad: bool):
    """Summed cross entropy of one chunk of logits (rows x vocab) and, if need_grad, d(sum)/d(logits).

    Elementwise work that torch.compile fuses into a kernel or two: softmax in float32, the loss of the target
    column, and the gradient softmax - onehot (rows whose target is -1 count for nothing) in the logits' dtype.
    """
    dtype = logits.dtype
    logits = logits.float()
    valid = targets != -1
    t = torch.where(valid, targets, 0)
    lse = torch.logsumexp(logits, dim=-1)
    loss = torch.where(valid, lse - logits.gather(1, t[:, None])[:, 0], 0.0).sum()
    if not need_grad:
        return loss, None
    probs = torch.exp(logits - lse[:, None])
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == t[:, None]
    grad = torch.where(valid[:, None], probs - onehot.float(), 0.0)
    return loss, grad.to(dtype)


if triton is not None:
    @triton.jit
    def _xent_rows(logits_ptr, targets_ptr, loss_ptr, grad_ptr, n_cols, BLOCK: tl.constexpr, NEED_GRAD: tl.constexpr):
        # xent_chunk for one row (one program per row): a pass for the max and the sum of exp together (online
        # softmax, one exp per logit: the running max is one number, rescaled once per block), then a pass that
        # writes softmax - onehot
        row = tl.program_id(0).to(tl.int64)
        logits_ptr += row * n_cols
        target = tl.load(targets_ptr + row)
        valid = target != -1
        # the largest logit so far and sum(exp(x - m)); m starts at float32's lowest finite value, not -inf, so
        # that a first block of -inf logits (masked) never computes -inf - -inf
        m = tl.max(tl.full((BLOCK,), -3.4028234663852886e38, tl.float32), 0)
        s = tl.sum(tl.zeros((BLOCK,), tl.float32), 0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(logits_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        x_target = tl.load(logits_ptr + tl.where(valid, target, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))
        if NEED_GRAD:
            grad_ptr += row * n_cols
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(logits_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
                g = tl.where(valid, tl.exp(x - lse) - (cols == target).to(tl.float32), 0.0)
                tl.store(grad_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)


def xent_rows(logits, targets, need_grad: bool):
    """xent_chunk (same arguments and results) as one Triton kernel, for CUDA.

    Inductor's kernel for xent_chunk reads each row three times (max, sum of exp, gradient); this one twice, and
    the second read mostly hits the L2 cache. On an H200: 0.410 ms instead of 0.538 for a chunk of 8192 x 32000
    bf16 logits (1.31x; 0.437 vs 0.577 for 65536 x 4096), the stories15M step ~2.5% faster. Two exps per logit
    instead of three (the first pass's running max one number per row, not one per lane) took another 6% off at
    32768 x 32000 (1.64 -> 1.54 ms), 17% at 65536 x 4096 (0.50 -> 0.42), and ~0.5 ms off the stories15M step.
    """
    logits, targets = logits.contiguous(), targets.contiguous()  # (no-ops for the chunks of linear_cross_entropy)
    rows, n_cols = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits) if need_grad else None
    block, warps = (1024, 4) if n_cols <= 8192 else (4096, 8)  # the best of 1024-4096 lanes x 2-16 warps
    # Triton launches on the current device, which may be another GPU (on a CPU tensor: Triton's interpreter)
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
        _xent_rows[(rows,)](logits, targets, loss, loss if grad is None else grad, n_cols, BLOCK=block,
                            NEED_GRAD=need_grad, num_warps=warps)
    return loss.sum(), grad


class _LinearCrossEntropy(torch.autograd.Function):
    """mean cross entropy of h @ weight.T, with the gradients computed in the forward pass, chunk by chunk.

    The backward pass of (matmul, log-softmax) needs the softmax of every logit; computing it while each chunk's
    logits are at hand and keeping only d/dh (tokens x dim) and d/dweight (vocab x dim) saves holding the
    logits, at the same matmul count (one forward, two backward per chunk). The gradients are kept unscaled in
    float32 and multiplied by the incoming gradient (1/accumulation steps, a float16 loss scale) in backward.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, xent, rows):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], rows):
            hc = h[s:s + rows]
            loss, g = xent(hc @ weight.t(), targets[s:s + rows], True)
            total += loss
            grad_h[s:s + rows] = g @ weight
            grad_w += (g.t() @ hc).float()
        count = (targets != -1).sum()
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        return (grad_h * scale).to(ctx.dtypes[0]), (grad_w * scale).to(ctx.dtypes[1]), None, None, None


LOGITS_PER_CHUNK = 2 ** 28  # linear_cross_entropy's chunk (except xent_rows'); forward() chunks any batch larger
KERNEL_CHUNK_BYTES = 2 ** 31  # linear_cross_entropy's chunk for xent_rows (CUDA's kernel), in bytes of logits


def linear_cross_entropy(h, weight, targets, xent=xent_chunk, chunk_elements=None):
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-1) without the whole logits matrix in memory.

    h: (..., dim), weight: (vocab, dim), targets: (...) with -1 for positions that do not count. Under autocast
    the matmuls run in its dtype, as nn.Linear's would; chunks of about chunk_elements logits each. By default
    LOGITS_PER_CHUNK, and for xent_rows KERNEL_CHUNK_BYTES of logits (2^30 in bfloat16; with their gradient,
    4 GiB): each chunk costs three matmuls' tails and a float32 addition of d/dweight, so fewer, larger ones made
    the stories15M step 2.6% faster on an H200 (44.7 -> 43.5 ms; +4.4 GiB peak memory). xent_chunk's temporaries
    are several times its chunk (float32 softmax, one-hot), so it keeps the smaller one.
    """
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
    if chunk_elements is None:
        chunk_elements = KERNEL_CHUNK_BYTES // h.element_size() if xent is xent_rows else LOGITS_PER_CHUNK
    chunks = max(1, math.ceil(h.shape[0] * weight.shape[0] / chunk_elements))
    rows = math.ceil(h.shape[0] / chunks)
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h, weight, targets, xent, rows)
        total = sum(xent(h[s:s + rows] @ weight.t(), targets[s:s + rows], False)[0]
                    for s in range(0, h.shape[0], rows))
        return total / (targets != -1).sum()


def adamw(param_groups, learning_rate, betas, device_type):
    """AdamW, fused where PyTorch has the kernel: several times faster than the per-tensor loop, on CPUs too."""
    fused = device_type in ("cuda", "cpu", "mps")
    print(f"AdamW fused: {fused}")
    return torch.optim.AdamW(param_groups, lr=learning_rate, betas=betas, fused=fused)


def newton_schulz(G, steps=5, dtype=torch.float32):
    """Orthogonalise each matrix of G (n, A, B): roughly U V^T of its SVD, singular values pushed into ~[0.7, 1.2].

    Keller Jordan's quintic iteration X <- a X + (b XX^T + c (XX^T)^2) X, whose coefficients lift small singular
    values fast rather than converge exactly. All n matrices run as one batched matmul (3 per iteration).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide side: X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius norm 1 bounds the spectral norm by 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X.mT if tall else X


# fast_bf16_matmul's verdict for the CPU: decided once per process, so that the dtype for training and Muon's
# precision agree; None until then. Under torchrun every process takes rank 0's (set_cpu_fast_bf16, from train.py):
# near the threshold, processes measuring for themselves could disagree, and then train in different dtypes
_cpu_fast_bf16 = None


def fast_bf16_matmul(device):
    """Whether bfloat16 matrix multiplies are faster than float32 ones on this device.

    CUDA GPUs with bf16 have tensor cores for it. CPUs multiply bf16 fast only with AVX512-BF16 or AMX; without
    them PyTorch emulates bf16, several times slower than float32 (torch.optim.Muon's bf16 Newton-Schulz made
    each step ~4x an AdamW step on an AVX2 laptop). Even where the flags exist, oneDNN can be limited
    (ONEDNN_MAX_CPU_ISA), so a short measurement of the Newton-Schulz matmul decides; bf16 must win clearly.
    """
    global _cpu_fast_bf16
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if _cpu_fast_bf16 is None:
        has_flag = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        _cpu_fast_bf16 = has_flag and _cpu_bf16_matmul_wins()
    return _cpu_fast_bf16


def set_cpu_fast_bf16(fast):
    """Take `fast` as fast_bf16_matmul's verdict for the CPU from now on, instead of deciding it in this process."""
    global _cpu_fast_bf16
    _cpu_fast_bf16 = bool(fast)


def _cpu_bf16_matmul_wins():
    """Whether a bfloat16 matmul takes under 0.7x the time of a float32 one on this CPU (~0.45x with AVX512-BF16).

    Timed on one thread, in that thread's CPU time: other work on the machine then does not sway the verdict. (In
    wall-clock time on every core it did: with other processes busy, runs of the same command chose either dtype,
    and a resumed run's reference run trained in the other one.)"""
    threads, seconds = torch.get_num_threads(), {}
    torch.set_num_threads(1)
    try:
        for dtype in (torch.float32, torch.bfloat16) * 3:
            x, y = torch.randn(4, 128, 256, dtype=dtype), torch.randn(4, 256, 256, dtype=dtype)
            torch.bmm(x, y)
            t = time.thread_time()
            for _ in range(4):
                torch.bmm(x, y)
            seconds[dtype] = min(seconds.get(dtype, math.inf), time.thread_time() - t)
    finally:
        torch.set_num_threads(threads)
    return seconds[torch.bfloat16] < 0.7 * seconds[torch.float32]


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024): momentum SGD whose update, for each 2-D hidden matrix, is orthogonalised.

    For each parameter: buf <- lerp(buf, grad, 1 - momentum); update = lerp(grad, buf, momentum) (Nesterov) or
    buf; W <- W (1 - lr wd) - lr sqrt(max(1, A/B)) newton_schulz(update). The same update and state layout as
    torch.optim.Muon (so its checkpoints load), with three differences that matter for speed:
    - Newton-Schulz runs in bfloat16 only where the device multiplies it fast, else in float32 (ns_dtype;
      None decides with fast_bf16_matmul). The choice is stored in the param group, so a resumed run keeps it.
    - matrices of the same shape are orthogonalised together, one batched matmul per shape.
    - like fused AdamW, step() honours `found_inf` (a 0-d tensor set by the caller): when it is > 0 the step
      changes nothing, decided on the device with no host sync. lr may also be a 0-d device tensor. Both make
      the step capturable in a CUDA graph (all state exists after the first step).
    """

    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, ns_dtype=ns_dtype))
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon takes 2-D matrices only; give embeddings and gains to AdamW")

    def _shape_scale(self, ps, like):
        """sqrt(max(1, fan_out / fan_in)) per matrix, as torch.optim.Muon scales ("original"); made once, on the
        device, so that a step captured in a CUDA graph copies nothing from the host."""
        key = (like.device, like.dtype, tuple(p.shape for p in ps))
        cache = self.__dict__.setdefault("_scales", {})
        if key not in cache:
            cache[key] = torch.tensor([math.sqrt(max(1.0, p.size(0) / p.size(1))) for p in ps], device=like.device,
                                      dtype=like.dtype)[:, None, None]
        return cache[key]

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "Muon takes no closure"
        skip = getattr(self, "found_inf", None)  # set by the caller, as for fused AdamW (grad_scale: not needed)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group.get("ns_dtype") is None:  # (a torch.optim.Muon checkpoint has no such entry)
                group["ns_dtype"] = "bfloat16" if fast_bf16_matmul(params[0].device) else "float32"
            ns_dtype = getattr(torch, group["ns_dtype"])  # a name, so that checkpoints hold plain data
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            if skip is not None:  # a skipped step moves nothing: a zero learning rate, a zero momentum weight
                keep = 1.0 - (skip > 0).float()
                lr, blend = lr * keep, (1 - momentum) * keep
            else:
                blend = 1 - momentum
            # one batched Newton-Schulz per shape; a tall matrix joins the wide ones of its transposed shape (the
            # iteration works on the wide side anyway), so w1/w3 (hidden x dim) and w2 (dim x hidden) go together
            by_shape = {}
            for p in params:
                by_shape.setdefault((min(p.shape), max(p.shape)), []).append(p)
            for ps in by_shape.values():
                tall = [p.size(0) > p.size(1) for p in ps]

                def wide(ts):  # each tall matrix transposed; transposing again brings it back
                    return [t.mT if flip else t for t, flip in zip(ts, tall)]

                grads = torch.stack(wide([p.grad for p in ps]))
                if skip is not None:  # a non-finite gradient must not reach the momentum, even times zero
                    grads = torch.where(skip > 0, 0.0, grads)
                bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in ps]
                buf = torch.stack(wide(bufs))
                buf.lerp_(grads, blend)
                torch._foreach_copy_(bufs, wide(buf.unbind(0)))
                update = grads.lerp_(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_steps"], ns_dtype).to(ps[0].dtype)
                update *= self._shape_scale(ps, update)
                torch._foreach_mul_(ps, 1 - lr * wd)
                torch._foreach_add_(ps, torch._foreach_mul(wide(update.unbind(0)), -lr))
        return None


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """One token id per row of logits (B, V), any float dtype (the draw itself is in float32)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    ids = None  # when set: the vocabulary ids of the columns left in logits
    if top_k is not None and top_k < logits.size(-1):
        # sample among the k likeliest only: the draw over k columns, not the whole vocabulary. On the logits as
        # they are (dividing by temperature keeps the order; bfloat16's 16-bit keys halve the radix select's
        # passes on CUDA), sorted only where top_p needs them in order: the sort costs more than the draw
        logits, ids = torch.topk(logits, top_k, dim=-1, sorted=top_p is not None and top_p < 1.0)
    if top_p is not None and top_p < 1.0:
        probs = F.softmax(logits.float() / temperature, dim=-1)
        if ids is None:
            probs, ids = probs.sort(dim=-1, descending=True)
        # drop a token when the likelier ones before it already reach top_p (the first one always stays)
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
        # draw one token per row: with E_i ~ Exp(1), the argmax of p_i / E_i is token i with probability p_i.
        # torch.multinomial draws one sample the same way, but first checks probs on the host: a device sync,
        # which a CUDA graph cannot contain
        choice = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1, keepdim=True)
    else:
        # the same draw in log space, which needs no softmax: argmax_i(logits_i / T - log E_i), times T > 0,
        # is argmax_i(logits_i - T log E_i) (-log E_i is Gumbel noise): two fused ops after the noise
        noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_().log_()
        choice = torch.add(logits, noise, alpha=-temperature).argmax(dim=-1, keepdim=True)
    return (choice if ids is None else ids.gather(-1, choice))[:, 0]


class Decoder:
    """Generation's inner loop: one new token per row through every layer, with shapes that never change.

    generate_stream() builds one per call. It holds what a step needs, made once:
    - the weights in the compute dtype (autocast's, else the model's), fused for inference: wq|wk|wv as one
      matrix and w1|w3 as another (one matmul each instead of three and two), each RMSNorm's gain folded into
      the matrix after it, and attention's 1/sqrt(head_dim) folded into wq (on a CPU, each matrix cut into one row
      block per thread);
    - a KV cache of max_seq_len positions for every layer, (n_layers, 2, B, n_kv_heads, max_seq_len, head_dim);
    - the position as a tensor on the device, which the step reads and advances itself.
    So a step allocates no tables or masks and is the same work at every position: it attends over the whole
    cache, with the positions not yet written masked out. On CUDA it is captured once in a CUDA graph and
    replayed for each token: one launch instead of hundreds, which is nearly all a small model's step costs.
    The prompt is prefilled by the model's own forward pass, writing into the same cache.
    """

    @torch.inference_mode()
    def __init__(self, model, batch_size, temperature=1.0, top_k=None, top_p=None, cuda_graph=True):
        a = model.args
        emb = model.tok_embeddings.weight
        self.model, self.args, self.B = model, a, batch_size
        self.sampling = (temperature, top_k, top_p)
        device = emb.device
        self.dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                      else emb.dtype)
        H, KV, hd, L = a.n_heads, a.n_kv_heads, a.dim // a.n_heads, a.max_seq_len

        # a CPU's BLAS computes a product with one row (batch 1) on one core: there each matrix is cut by rows into
        # one block per thread, and one bmm over the blocks runs them in parallel (see _linear). With more rows
        # BLAS splits the work itself, and the blocks only cost copies (batch 16 on 2 cores: 0.84x the old loop)
        self.blocks = torch.get_num_threads() if device.type == "cpu" and batch_size == 1 else 1

        def prepared(w):
            w = w.to(self.dtype)
            n = self.blocks
            return w if n == 1 or w.shape[0] % n else w.view(n, w.shape[0] // n, w.shape[1]).transpose(1, 2)

        def fused(norm, *weights):  # norm(x) @ W.T == (x / rms(x)) @ (W * gain).T
            return prepared(torch.cat(weights).float() * norm.weight.float())

        self.weights = []
        for layer in model.layers:
            att, ffn = layer.attention, layer.feed_forward
            wqkv = fused(layer.attention_norm, att.wq.weight / math.sqrt(hd), att.wk.weight, att.wv.weight)
            w13 = fused(layer.ffn_norm, ffn.w1.weight, ffn.w3.weight)
            self.weights.append((wqkv, prepared(att.wo.weight), w13, prepared(ffn.w2.weight)))
        self.w_out = fused(model.norm, model.output.weight)

        # rotary embedding as what it is: each pair (x[2i], x[2i+1]) of q and k times a 2x2 rotation matrix, here
        # for every pair of the fused q|k|v row at once (one batched matmul), the identity over v's pairs.
        # rope[p, i] is pair i's matrix at position p, for a row vector: (x0, x1) @ [[cos, sin], [-sin, cos]]
        cos = F.pad(model.rope_cos.repeat(1, H + KV), (0, KV * hd // 2), value=1.0)  # (L, pairs)
        sin = F.pad(model.rope_sin.repeat(1, H + KV), (0, KV * hd // 2))
        self.rope = torch.stack((torch.stack((cos, sin), -1), torch.stack((-sin, cos), -1)), -2).to(self.dtype)
        # row p: added to the attention scores of the query at position p (-inf hides positions after p)
        self.mask = torch.full((L, L), float("-inf"), device=device).triu(1).to(self.dtype)

        self.cache = torch.zeros(a.n_layers, 2, batch_size, KV, L, hd, dtype=self.dtype, device=device)
        # the same memory seen as forward()'s per-layer (k, v) buffers (prefill) and as bmm's operands (steps)
        self.prefill_cache = [(c[0], c[1]) for c in self.cache]
        self.keys_t = [c[0].view(batch_size * KV, L, hd).transpose(1, 2) for c in self.cache]
        self.values = [c[1].view(batch_size * KV, L, hd) for c in self.cache]

        self.token = torch.zeros(batch_size, dtype=torch.long, device=device)  # the last token sampled
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # its position in the window
        self.graph = None
        if cuda_graph and device.type == "cuda":
            self._capture()

    @torch.inference_mode()
    def prefill(self, tokens):
        """Fill the cache with tokens (B, T), the window, from position 0; returns the next token (B,)."""
        logits = self.model(tokens, cache=self.prefill_cache, start_pos=0)
        self.pos.fill_(tokens.shape[1])
        self.token.copy_(sample_next(logits[:, -1, :].float(), *self.sampling))
        return self.token.clone()

    @torch.inference_mode()
    def step(self):
        """Run the last token sampled (B,) at the next position; returns the token sampled after it (B,).

        The step feeds itself (a row that generate_stream() pads with EOS after it finished goes on with its own
        tokens, which nothing reads): no copy in per token, only the copy out, which the next step overwrites.
        """
        if self.graph is None:
            self._step()
        else:
            self.graph.replay()
        return self.token.clone()

    def _step(self):
        a, B = self.args, self.B
        H, KV, hd = a.n_heads, a.n_kv_heads, a.dim // a.n_heads
        with torch.autocast(self.pos.device.type, enabled=False):  # the weights are in the compute dtype already
            h = self.model.tok_embeddings(self.token.view(B, 1)).view(B, a.dim).to(self.dtype)
            rope = self.rope.index_select(0, self.pos)  # (1, pairs, 2, 2): this position's rotations
            mask = self.mask.index_select(0, self.pos).view(1, 1, -1)
            for (wqkv, wo, w13, w2), cache, keys_t, values in zip(self.weights, self.cache, self.keys_t, self.values):
                qkv = _linear(F.rms_norm(h, (a.dim,), eps=a.norm_eps), wqkv)
                qkv = torch.matmul(qkv.view(B, -1, 1, 2), rope).view(B, -1)
                q, kv = qkv.split((H * hd, 2 * KV * hd), dim=1)
                cache.index_copy_(3, self.pos, kv.view(B, 2, KV, 1, hd).transpose(0, 1))
                # grouped-query attention: the n_heads // n_kv_heads query heads that share a kv head are that
                # head's rows of queries, so one batched matmul per side covers every head with no copy of the cache
                scores = torch.baddbmm(mask, q.reshape(B * KV, H // KV, hd), keys_t)
                y = torch.bmm(torch.softmax(scores, dim=-1), values).view(B, H * hd)
                _add_linear_(h, y, wo)
                gate, up = _linear(F.rms_norm(h, (a.dim,), eps=a.norm_eps), w13).chunk(2, dim=1)
                _add_linear_(h, F.silu(gate) * up, w2)
            logits = _linear(F.rms_norm(h, (a.dim,), eps=a.norm_eps), self.w_out)
            self.pos += 1
            self.token.copy_(sample_next(logits, *self.sampling))

    def _capture(self):
        """Record one step in a CUDA graph, after warm-up runs (which cuBLAS needs)."""
        stream = torch.cuda.Stream(self.pos.device)
        stream.wait_stream(torch.cuda.current_stream(self.pos.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.pos.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        # the warm-up wrote into the cache: harmless, as a position is written (by prefill() or by the step at that
        # position) before any query can see it


def _linear(x, w):
    """x @ W.T for a Decoder's weight: W itself (out, in), or W's row blocks as (blocks, in, out / blocks)."""
    if w.dim() == 2:
        return F.linear(x, w)
    return torch.bmm(x.expand(w.shape[0], *x.shape), w).transpose(0, 1).reshape(x.shape[0], -1)


def _add_linear_(h, x, w):
    """h += x @ W.T, in place; for a whole W inside the matmul itself (addmm's accumulate)."""
    return h.addmm_(x, w.t()) if w.dim() == 2 else h.add_(_linear(x, w))


# -----------------------------------------------------------------------------
# peak dense bf16 tensor FLOP/s (vendor datasheets, no sparsity); the first name fragment found in
# torch.cuda.get_device_name() wins, so more specific names come first
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),      # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),      # no bf16: its fp16 tensor-core peak
    ("T4", 65e12),         # likewise fp16
]


def device_peak_flops(name=None):
    """Peak FLOP/s of the current CUDA device (or of the device called name), or None when unknown."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment in name:
            return flops
    return None


# -----------------------------------------------------------------------------
# device and dtype selection, shared by train.py, sample.py and export.py

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device="auto"):
    """'auto' → cuda, then mps, then cpu. An explicit device must exist."""
    mps_ok = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    try:
        kind = torch.device(device).type  # "cpu:0" is a CPU, "cuda:x" no device at all
    except RuntimeError:
        kind = None
    if kind == "cuda" and not torch.cuda.is_available():
        fail(f"device '{device}' asked for, but PyTorch sees no CUDA GPU; use --device=cpu or --device=auto")
    if kind == "mps" and not mps_ok:
        fail(f"device '{device}' asked for, but MPS is not available; use --device=auto")
    if kind not in ("cuda", "mps", "cpu"):
        fail(f"unknown device '{device}'; choose auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(dtype, device, training=False):
    """'auto' → bfloat16 on a GPU that supports it, else float16 on CUDA; on a CPU float32, or for training
    bfloat16 where the CPU multiplies it fast (fast_bf16_matmul: AVX512-BF16 or AMX): its matmuls then run ~2.3x
    faster and tiny's whole step ~1.3x, which the wall-clock budget turns into more steps. (Sampling stays float32
    on a CPU: its decoder keeps float32 weights of its own.)"""
    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if training and fast_bf16_matmul(device) else "float32"
    if dtype not in DTYPES:
        fail(f"unknown dtype '{dtype}'; choose auto, float32, bfloat16 or float16")
    if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        fail("this GPU does not support bfloat16; use --dtype=float16 (or auto)")
    return dtype


def autocast_ctx(device, dtype, cache=True):
    """Mixed precision for the forward pass; float32 needs none. cache=False for CUDA graph capture (PyTorch's
    advice: the cache of weight casts must not hold tensors made during capture)."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype], cache_enabled=cache)


# -----------------------------------------------------------------------------
# checkpoints: one format for train.py (writes), sample.py and export.py (read, with load_model)

def save_checkpoint(ckpt, path):
    """Write atomically: a crash or a full disk mid-write leaves the previous checkpoint as it was (and no partial
    file behind); a failure is a one-line error."""
    try:
        atomic_write(path, lambda f: torch.save(ckpt, f))
    except OSError as e:
        raise SystemExit(f"error: could not write {path} ({e.strerror or e}); the previous checkpoint there, if any, "
                         "is unchanged. Free some disk space (or fix the path) and run the same command "
                         "again") from None


def load_checkpoint(path, map_location="cpu"):
    """Load a tinyllm checkpoint safely (weights_only: tensors and plain data, never pickled code)."""
    path = os.fspath(path)
    if os.path.isdir(path):  # a run folder: name the checkpoints in it
        found = [name for name in ("ckpt.pt", "best.pt") if os.path.isfile(os.path.join(path, name))]
        where = (" or ".join(os.path.join(path, name) for name in found) if found else
                 "a checkpoint file (it holds no ckpt.pt or best.pt)")
        raise SystemExit(f"error: {path} is a directory; pass {where}")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}; train one with `python train.py configs/tiny.py` "
                         "or pass the right --ckpt")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; random or cut-off bytes are not one
        raise SystemExit(f"error: {path} is truncated or not a PyTorch checkpoint (not the zip archive torch.save "
                         "writes); re-run training or pick another checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise SystemExit(f"error: {path} holds pickled Python objects beyond tensors and plain data; it was not "
                         "written by tinyllm and was not loaded (nothing in it was executed)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise SystemExit(f"error: {path} is truncated or not a PyTorch checkpoint ({str(e).splitlines()[0]}); "
                         "re-run training or pick another checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("tinyllm") is None or "model" not in ckpt or "model_args" not in ckpt:
        raise SystemExit(f"error: {path} is not a tinyllm checkpoint (no 'tinyllm', 'model' and 'model_args' "
                         "entries); use a ckpt.pt written by train.py")
    return ckpt


def checkpoint_dict(model, model_args, **extra):
    """The entries every tinyllm checkpoint has; train.py adds optimizer, RNG and data state through extra."""
    state = model.state_dict()
    # torch.compile wraps the model: strip its prefix so checkpoints load into a plain Transformer
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    return {"tinyllm": 1, "model": state, "model_args": asdict(model_args), **extra}


def load_model(ckpt_path, tokenizer_path=""):
    """The model (on CPU, eval mode) and tokenizer of a checkpoint, or a one-line error. Returns (model, tok, ckpt).
    The tokenizer is the one stored in the checkpoint, or tokenizer_path (a sentencepiece .model) when given."""
    ck = load_checkpoint(ckpt_path)  # weights_only: refuses pickled code without running it
    model = Transformer.from_checkpoint(ck, ckpt_path).eval()
    if tokenizer_path:
        if not os.path.isfile(tokenizer_path):
            raise SystemExit(f"error: no tokenizer at --tokenizer={tokenizer_path}; give a sentencepiece .model file, "
                             "or leave --tokenizer out to use the one stored in the checkpoint")
        tok = Tokenizer(tokenizer_path)
        if ck.get("tokenizer") is not None and tok.model_bytes != bytes(ck["tokenizer"]):
            print(f"warning: {tokenizer_path} is not the tokenizer this model was trained with (the checkpoint "
                  "holds its own; drop --tokenizer to use it)", file=sys.stderr)
    elif ck.get("tokenizer") is not None:
        tok = Tokenizer.from_bytes(ck["tokenizer"])
    else:
        raise SystemExit(f"error: {ckpt_path} holds no tokenizer; pass the one it was trained with, e.g. "
                         "--tokenizer=data/tok4096.model")
    if tok.vocab_size != model.args.vocab_size:
        raise SystemExit(f"error: the tokenizer has {tok.vocab_size} pieces but the model's vocab_size is "
                         f"{model.args.vocab_size}; pass the tokenizer the model was trained with (or drop "
                         "--tokenizer to use the checkpoint's own)")
    return model, tok, ck
