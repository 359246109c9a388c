"""Behaviour of model.py: shapes, loss, causality, RoPE, generation, counts, optimizer groups, MFU, checkpoints."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import model as model_module
from conftest import RunsCode
from model import (ModelArgs, Transformer, apply_rope, autocast_ctx, load_checkpoint, pick_device, pick_dtype,
                   rope_tables, sample_next, save_checkpoint, checkpoint_dict)


def tiny(**kw):
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=32)
    args.update(kw)
    return ModelArgs(**args)


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(tiny(**kw)).eval()


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (8, 1)])  # GQA ratios 1, 2, 8
def test_shapes(n_heads, n_kv_heads):
    m = build(dim=64, n_heads=n_heads, n_kv_heads=n_kv_heads)
    x = torch.randint(0, 64, (3, 17))
    assert m(x, x).shape == (3, 17, 64)
    assert m.last_loss.ndim == 0
    assert m(x).shape == (3, 1, 64)
    assert m.last_loss is None


def test_args_derive_and_validate():
    a = ModelArgs(dim=288, n_heads=8)
    assert a.n_kv_heads == 8 and a.hidden_dim == 768  # 4*288*2/3 = 768, already a multiple of 32
    assert ModelArgs(dim=96, n_heads=4, multiple_of=64).hidden_dim == 256  # 256 exactly
    assert ModelArgs(dim=100, n_heads=2, multiple_of=64).hidden_dim == 320  # 266 rounded up to 64s
    with pytest.raises(ValueError, match="divisible by n_kv_heads"):
        ModelArgs(n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ModelArgs(dim=100, n_heads=8)
    with pytest.raises(ValueError, match="even"):
        ModelArgs(dim=24, n_heads=8)
    with pytest.raises(ValueError, match="dropout"):
        ModelArgs(dropout=1.5)


def test_last_loss_is_cross_entropy_with_ignore_index():
    m = build()
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    y[0, :5] = -1
    logits = m(x, y)
    expected = F.cross_entropy(logits.view(-1, 64), y.view(-1), ignore_index=-1)
    assert torch.allclose(m.last_loss, expected)


def test_causal():
    m = build()
    x = torch.randint(0, 64, (1, 20))
    before = m(x, x)
    x2 = x.clone()
    x2[0, 12:] = (x2[0, 12:] + 1) % 64
    after = m(x2, x2)
    assert torch.equal(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_rope_depends_only_on_relative_position():
    torch.manual_seed(0)
    cos, sin = rope_tables(16, 64, 10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def rotated(v, pos):
        return apply_rope(v.view(1, 1, 1, 16), cos[pos:pos + 1], sin[pos:pos + 1]).view(16)

    dot = lambda m, n: torch.dot(rotated(q, m), rotated(k, n))
    assert torch.allclose(dot(3, 1), dot(40, 38), atol=1e-5)
    assert torch.allclose(dot(10, 10), dot(0, 0), atol=1e-5)
    assert not torch.allclose(dot(3, 1), dot(3, 2), atol=1e-3)
    assert torch.allclose(rotated(q, 7).norm(), q.norm(), atol=1e-5)  # a rotation keeps lengths


def test_kv_cache_greedy_equals_full_recompute():
    m = build(seed=1)
    prompt = torch.randint(0, 64, (2, 5))
    fast = m.generate(prompt, 50, temperature=0)
    slow = m.generate(prompt, 50, temperature=0, use_cache=False)
    assert fast.shape == (2, 55)
    assert torch.equal(fast, slow)
    # the cache must really be used: a single step's forward sees one token
    seen = []
    hook = m.tok_embeddings.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    m.generate(prompt, 5, temperature=0)
    hook.remove()
    assert seen == [5, 1, 1, 1, 1]


def test_greedy_recompute_matches_plain_argmax():
    m = build(seed=2)
    idx = torch.randint(0, 64, (1, 4))
    out = m.generate(idx, 10, temperature=0)
    for t in range(4, 14):  # every generated token is the argmax of a full forward over its prefix
        assert out[0, t] == m(out[:, :t])[0, -1].argmax()


def test_generation_past_max_seq_len_slides_the_window():
    m = build(seed=3, max_seq_len=16)
    prompt = torch.randint(0, 64, (1, 20))  # longer than the context: cropped
    fast = m.generate(prompt, 40, temperature=0)
    slow = m.generate(prompt, 40, temperature=0, use_cache=False)
    assert fast.shape == (1, 60)
    assert torch.equal(fast, slow)


def test_batched_generation_equals_one_row_at_a_time():
    m = build(seed=5, max_seq_len=16)
    prompts = torch.randint(0, 64, (3, 6))
    batch = m.generate(prompts, 30, temperature=0)  # 30 > max_seq_len: every row's window slides
    for row in range(3):
        assert torch.equal(batch[row:row + 1], m.generate(prompts[row:row + 1], 30, temperature=0))
    assert torch.equal(batch, m.generate(prompts, 30, temperature=0, use_cache=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_equals_uncaptured():
    m = build(seed=6, max_seq_len=16).cuda()
    prompt = torch.randint(0, 64, (2, 5), device="cuda")
    captured = m.generate(prompt, 40, temperature=0)  # past max_seq_len: the window slides, the graph replays on
    assert torch.equal(captured, m.generate(prompt, 40, temperature=0, cuda_graph=False))
    assert torch.equal(captured, m.generate(prompt, 40, temperature=0, use_cache=False))
    with autocast_ctx("cuda", "bfloat16"):  # the step in bf16: captured and eager run the very same kernels
        bf16 = m.generate(prompt, 40, temperature=0)
        assert torch.equal(bf16, m.generate(prompt, 40, temperature=0, cuda_graph=False))
    eos = int(captured[0, 8])
    stopped = m.generate(prompt[:1], 40, temperature=0, eos_id=eos)
    assert stopped[0, -1] == eos and stopped.shape[1] == (captured[0, 5:] == eos).nonzero()[0].item() + 6
    # sampling runs inside the graph: top_k=1 is greedy, and top_k=3 draws only among the 3 likeliest
    assert torch.equal(m.generate(prompt, 20, temperature=1.5, top_k=1), captured[:, :25])
    sampled = m.generate(prompt, 11, temperature=2.0, top_k=3)  # within max_seq_len, to check by full forwards
    for t in range(5, 16):
        logits = m(sampled[:, :t])[:, -1]
        assert (logits > logits.gather(1, sampled[:, t:t + 1])).sum(1).le(2).all()


def test_eos_stops_generation():
    m = build(seed=4)
    prompt = torch.randint(0, 64, (1, 3))
    greedy = m.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 5])  # declare the 3rd generated token the end of text
    out = m.generate(prompt, 10, temperature=0, eos_id=eos)
    first = (greedy[0, 3:] == eos).nonzero()[0].item() + 3
    assert out.shape[1] == first + 1 and out[0, -1] == eos


def test_top_k_and_top_p_stay_in_the_allowed_set():
    torch.manual_seed(0)
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]]).repeat(4000, 1)
    top3 = sample_next(logits, temperature=1.5, top_k=3)
    assert set(top3.tolist()) == {0, 1, 2}
    probs = F.softmax(logits[0], -1)  # 0.44, 0.27, 0.16, 0.06 ...: the nucleus of 0.8 is tokens 0, 1, 2
    assert probs[:2].sum() < 0.8 <= probs[:3].sum()
    nucleus = sample_next(logits, temperature=1.0, top_p=0.8)
    assert set(nucleus.tolist()) == {0, 1, 2}
    both = sample_next(logits, temperature=1.0, top_k=2, top_p=0.99)
    assert set(both.tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=1e-6).tolist()) == {0}  # the likeliest token always stays
    assert set(sample_next(logits, temperature=0).tolist()) == {0}


def draws_match_softmax_of_top_k(draws, logits, temperature, k):
    """The draws fall only on the k likeliest columns, each as often as softmax(logits / T) over those k says
    (200k draws: the tolerance is over 4 standard errors)."""
    logits = logits.double().cpu()
    freq = torch.bincount(draws.flatten().cpu(), minlength=logits.numel()).double() / draws.numel()
    top = logits.topk(k).indices
    expected = torch.zeros_like(freq)
    expected[top] = F.softmax(logits[top] / temperature, -1)
    assert (freq[expected == 0] == 0).all(), freq
    assert torch.allclose(freq, expected, atol=0.005), (freq, expected)


@pytest.mark.parametrize("temperature,k", [(1.5, 4), (0.5, 3), (0.8, 8)])  # k = 8: no top-k, the whole row
def test_sampling_follows_softmax_over_the_top_k(temperature, k):
    torch.manual_seed(0)
    logits = torch.tensor([1.0, -2.0, 3.0, 0.0, 2.5, -3.0, 2.0, -1.0])  # the likeliest are not the first columns
    draws = sample_next(logits.expand(200_000, -1), temperature, top_k=k)
    draws_match_softmax_of_top_k(draws, logits, temperature, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_in_a_cuda_graph_draws_afresh_at_each_replay():
    # what the captured decode step relies on: bfloat16 logits (these values are exact in it), fresh noise per replay
    logits = torch.tensor([1.0, -2.0, 3.0, 0.0, 2.5, -3.0, 2.0, -1.0], device="cuda")
    rows = logits.bfloat16().expand(40_000, -1)
    out = torch.zeros(rows.shape[0], dtype=torch.long, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out.copy_(sample_next(rows, 1.5, top_k=4))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(sample_next(rows, 1.5, top_k=4))
    draws = []
    for _ in range(5):
        graph.replay()
        draws.append(out.clone())
    assert not any(torch.equal(draws[0], d) for d in draws[1:])
    draws_match_softmax_of_top_k(torch.stack(draws), logits, 1.5, 4)


def test_parameter_count_matches_analytic_count():
    a = ModelArgs(dim=288, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=4096, max_seq_len=256)
    m = Transformer(a)
    hd = a.dim // a.n_heads
    per_layer = (a.dim * a.n_heads * hd + 2 * a.dim * a.n_kv_heads * hd + a.n_heads * hd * a.dim
                 + 3 * a.dim * a.hidden_dim + 2 * a.dim)
    expected = a.vocab_size * a.dim + a.n_layers * per_layer + a.dim
    assert m.num_params() == expected == 8_483_616
    assert m.num_params(non_embedding=True) == expected - a.vocab_size * a.dim
    assert m.output.weight is m.tok_embeddings.weight


def test_seed_shape_forward_backward_on_cpu():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=288, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=4096, max_seq_len=256))
    x, y = torch.randint(0, 4096, (2, 2, 256))
    m(x, y)
    assert abs(m.last_loss.item() - math.log(4096)) < 1.0  # near-uniform at init
    m.last_loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_scaled_init_on_residual_output_projections():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=256, n_layers=8, n_heads=8, vocab_size=512))
    small = 0.02 / math.sqrt(16)
    for layer in m.layers:
        assert abs(layer.attention.wo.weight.std().item() - small) < 0.002
        assert abs(layer.feed_forward.w2.weight.std().item() - small) < 0.002
        assert abs(layer.feed_forward.w3.weight.std().item() - 0.02) < 0.002
        assert abs(layer.attention.wq.weight.std().item() - 0.02) < 0.002


def test_configure_optimizers_groups(capsys):
    m = build()
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))
    assert len(no_decay["params"]) == 2 * 2 + 1  # two norms per layer, one final
    assert decay["lr"] == 1e-3 and decay["betas"] == (0.9, 0.95)
    assert "decayed tensors" in capsys.readouterr().out


def test_estimate_mfu_counts_the_flops_of_a_real_step(monkeypatch):
    """estimate_mfu's 6N + 12LHQT FLOPs per token against torch's FlopCounterMode on a real forward + backward.

    The counter sees the matmuls: aten.mm (every linear layer and the tied LM head: 6 FLOPs per weight per token)
    and, with SDPA on its math backend, aten.bmm (the attention scores and the weighted sum: 12LHQT per token; the
    causal mask is applied to full T x T products, so nothing is halved). The formula also counts the RMSNorm gains
    in N, which do no matmul: the two agree within 1% here (0.3%), exactly once the gains are taken out."""
    m = build(dim=64, n_heads=4, n_kv_heads=2, vocab_size=128).train()
    a, rows = m.args, 2
    x, y = torch.randint(0, 128, (2, rows, a.max_seq_len))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m(x, y, return_logits=False)
        m.last_loss.backward()
    counted = {str(op): n for op, n in fc.get_flop_counts()["Global"].items()}
    assert set(counted) == {"aten.mm", "aten.bmm"}
    tokens = rows * a.max_seq_len
    formula = m.estimate_mfu(rows, 1.0, peak_flops=1.0)  # FLOPs per iteration of `rows` sequences per second
    assert fc.get_total_flops() == pytest.approx(formula, rel=0.01)
    gains = sum(p.numel() for p in m.parameters() if p.dim() == 1)
    assert counted["aten.mm"] == 6 * (m.num_params() - gains) * tokens
    assert counted["aten.mm"] + counted["aten.bmm"] == formula - 6 * gains * tokens
    # the MFU is those FLOPs over the time and the device's peak, looked up by its name
    assert math.isnan(m.estimate_mfu(4, 0.5))  # CPU: no peak known, so no number at all rather than a wrong one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A10G", 70e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_, name=name: name)
        assert m.estimate_mfu(4, 0.5) == pytest.approx(formula / rows * 4 / 0.5 / peak)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Mystery Accelerator 9000")
    assert math.isnan(m.estimate_mfu(4, 0.5))
    assert m.estimate_mfu(4, 0.5, peak_flops=100e12) == pytest.approx(formula / rows * 4 / 0.5 / 100e12)


def test_device_and_dtype_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") in ("cpu", "mps")
    assert pick_device("cpu") == "cpu"
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        pick_device("cuda")
    with pytest.raises(SystemExit, match="unknown device"):
        pick_device("tpu")
    assert pick_dtype("auto", "cpu") == "float32"  # sampling
    for fast in (False, True):  # training: bfloat16 only where this CPU multiplies it fast
        monkeypatch.setattr(model_module, "fast_bf16_matmul", lambda device: fast)
        assert pick_dtype("auto", "cpu", training=True) == ("bfloat16" if fast else "float32")
    assert pick_dtype("bfloat16", "cpu") == "bfloat16"  # explicit is honoured
    with pytest.raises(SystemExit, match="unknown dtype"):
        pick_dtype("fp8", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype("auto", "cuda") == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype("auto", "cuda") == "bfloat16"
    with autocast_ctx("cpu", "bfloat16"):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast_ctx("cpu", "float32"):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_checkpoint_round_trip(tmp_path):
    m = build(seed=5)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(checkpoint_dict(m, m.args, iter_num=7, tokenizer=b"\x00bytes"), path)
    assert not os.path.exists(str(path) + ".tmp")
    ckpt = load_checkpoint(path)
    assert ckpt["iter_num"] == 7 and ckpt["tokenizer"] == b"\x00bytes"
    m2 = Transformer.from_checkpoint(ckpt).eval()
    x = torch.randint(0, 64, (1, 8))
    assert torch.equal(m(x), m2(x))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    m = build()
    good = tmp_path / "good.pt"
    save_checkpoint(checkpoint_dict(m, m.args), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SystemExit, match="truncated"):
        load_checkpoint(truncated)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(SystemExit, match="not a tinyllm checkpoint"):
        load_checkpoint(plain)
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"tinyllm": 1, "model": {}, "model_args": {}, "x": RunsCode(str(marker))}, evil)
    with pytest.raises(SystemExit, match="not loaded"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_missing_key_refused():
    m = build()
    state = checkpoint_dict(m, m.args)
    del state["model"]["norm.weight"]
    with pytest.raises(SystemExit, match="norm.weight"):
        Transformer.from_checkpoint(state)


def test_chunked_lm_head_loss_and_gradients_equal_the_full_logits():
    m = build()
    x = torch.randint(0, 64, (3, 20))
    y = torch.randint(0, 64, (3, 20))
    y[1, :7] = -1  # ignored positions count for nothing
    m(x, y)
    m.last_loss.backward()
    full = [p.grad.clone() for p in m.parameters()]
    loss = m.last_loss.detach()
    m.zero_grad()
    assert m(x, y, return_logits=False) is None
    (m.last_loss * 3).backward()  # the incoming gradient (1/accumulation, a loss scale) scales every gradient
    assert torch.allclose(m.last_loss, loss, atol=1e-6)
    for a, p in zip(full, m.parameters()):
        assert torch.allclose(3 * a, p.grad, atol=1e-6)
    # several chunks, and the no-grad (evaluation) path
    h = torch.randn(2, 37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (2, 37))
    ref = F.cross_entropy((h @ w.t()).view(-1, 50), t.view(-1))
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = model_module.linear_cross_entropy(h, w, t, chunk_elements=600)  # 5 chunks of 15 rows
    out.backward()
    assert torch.allclose(out, ref) and torch.allclose(h.grad, gh, atol=1e-6) and torch.allclose(w.grad, gw, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(model_module.linear_cross_entropy(h, w, t, chunk_elements=600), ref)


def test_default_chunks_bound_the_logits_in_memory(monkeypatch):
    """CUDA's kernel takes chunks of KERNEL_CHUNK_BYTES of logits (by the matmul dtype's size); xent_chunk, whose
    float32 temporaries are several times its chunk, takes LOGITS_PER_CHUNK logits, on any device."""
    rows_seen = []

    def kernel(logits, targets, need_grad):  # stands in for xent_rows (Triton), recording its chunks
        rows_seen.append(logits.shape[0])
        return model_module.xent_chunk(logits, targets, need_grad)

    monkeypatch.setattr(model_module, "xent_rows", kernel)
    monkeypatch.setattr(model_module, "KERNEL_CHUNK_BYTES", 2048)  # 512 float32 logits, 1024 in bfloat16
    monkeypatch.setattr(model_module, "LOGITS_PER_CHUNK", 160)
    h, w, t = torch.randn(40, 8), torch.randn(16, 8), torch.randint(0, 16, (40,))
    ref = F.cross_entropy(h @ w.t(), t)
    assert torch.allclose(model_module.linear_cross_entropy(h, w, t, kernel), ref)
    assert rows_seen == [20, 20]  # 640 logits in chunks of at most 512
    rows_seen.clear()
    model_module.linear_cross_entropy(h.bfloat16(), w.bfloat16(), t, kernel)
    assert rows_seen == [40]
    rows_seen.clear()
    monkeypatch.setattr(model_module, "xent_rows", None)  # the same function, now not the kernel
    model_module.linear_cross_entropy(h, w, t, kernel)
    assert rows_seen == [10, 10, 10, 10]  # at most 160 logits each


def check_xent_rows(device):
    """xent_rows against xent_chunk: loss and gradient in each training dtype, ignored rows, rows narrower than one
    block of the kernel and rows of several blocks (the last one partly past the end), logits far below zero, a
    first block of masked (-inf) logits, with and without the gradient."""
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rows, vocab, scale in ((4, 1, 3), (5, 64, 3), (6, 1000, 3), (4, 5000, 3), (3, 9000, 3), (3, 50, -1e35)):
            if dtype == torch.float16 and abs(scale) > 1e4:
                continue
            logits = (torch.randn(rows, vocab, device=device).abs() * scale).to(dtype)
            targets = torch.randint(0, vocab, (rows,), device=device)
            targets[1] = -1
            loss, grad = model_module.xent_rows(logits, targets, True)
            ref_loss, ref_grad = model_module.xent_chunk(logits, targets, True)
            assert grad.dtype == dtype and not grad[1].any()
            assert torch.allclose(loss, ref_loss) and torch.allclose(grad.float(), ref_grad.float(), atol=4e-3)
            loss, grad = model_module.xent_rows(logits, targets, False)
            assert grad is None and torch.allclose(loss, ref_loss)
        # row 0's first block (4096 logits at vocab 9000) all -inf: the running max must not start at -inf
        logits = torch.randn(3, 9000, device=device).to(dtype)
        logits[0, :4096] = float("-inf")
        targets = torch.tensor([5000, -1, 7], device=device)
        loss, grad = model_module.xent_rows(logits, targets, True)
        ref_loss, ref_grad = model_module.xent_chunk(logits, targets, True)
        assert torch.allclose(loss, ref_loss) and torch.allclose(grad.float(), ref_grad.float(), atol=4e-3)


@pytest.mark.skipif(model_module.triton is None, reason="needs Triton (PyTorch's CUDA builds bring it)")
def test_cuda_cross_entropy_kernel_matches_xent_chunk():
    if torch.cuda.is_available():
        check_xent_rows("cuda")
    else:  # no GPU: the same kernel through Triton's interpreter, on CPU tensors
        here = os.path.dirname(os.path.abspath(__file__))
        code = f"import sys; sys.path[:0] = [{os.path.dirname(here)!r}, {here!r}]; import test_model; " \
               "test_model.check_xent_rows('cpu')"
        r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_attention_with_padded_head_size_matches_cpu():
    # head size 36 (dim 72, 2 heads, 1 kv head): CUDA pads it to 40 for its fast kernels, the CPU does not
    m = build(dim=72, n_heads=2, n_kv_heads=1).train()
    x = torch.randint(0, 64, (3, 32))
    m(x, x, return_logits=False)
    m.last_loss.backward()
    ref = [m.last_loss.detach()] + [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        m.cuda()
        m(x.cuda(), x.cuda(), return_logits=False)
        m.last_loss.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    got = [m.last_loss.detach()] + [p.grad for p in m.parameters()]
    for a, b in zip(ref, got):
        assert torch.allclose(a, b.cpu(), rtol=1e-4, atol=1e-6)


def test_cpu_bfloat16_attention_runs_in_float32(monkeypatch):
    """Under CPU bfloat16 autocast the matmuls run in bfloat16 but attention in float32 (its bfloat16 backward pass
    is ~2x slower there); the block's output keeps autocast's dtype."""
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: seen.append(q.dtype) or sdpa(q, *a, **k))
    m = build(seed=3)
    x = torch.randint(0, m.args.vocab_size, (2, 16))
    with autocast_ctx("cpu", "bfloat16"):
        m(x, x, return_logits=False)
        h = m.layers[0].attention(torch.randn(2, 16, m.args.dim), m.rope_cos[:16], m.rope_sin[:16])
    m.last_loss.backward()
    assert seen and set(seen) == {torch.float32}
    assert h.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("version,cache", [("2.12.1", False), ("2.13.0a0", False), ("2.13.0", True)])
def test_compile_regions_turns_the_aot_autograd_cache_off_before_2_13(monkeypatch, version, cache):
    """Before torch 2.13 the AOTAutograd cache handed one autocast dtype's compiled blocks to a run in the other
    (pytorch/pytorch#181564; on a GPU, test_compiled_blocks_keep_their_dtype_from_run_to_run shows it); from 2.13
    on it tells them apart and stays on."""
    from torch._functorch import config
    from torch.torch_version import TorchVersion
    monkeypatch.setattr(torch, "__version__", TorchVersion(version))
    with config.patch(enable_autograd_cache=True):  # (restored after the test)
        build().compile_regions()  # (compiles lazily: nothing is compiled here)
        assert config.enable_autograd_cache is cache
