"""model.Muon: the update against a float64 reference and torch.optim.Muon, the on-device skip, tensor lr, state."""

import math
import os
import subprocess
import sys

import pytest
import torch

import model
from model import Muon, fast_bf16_matmul, newton_schulz, set_cpu_fast_bf16

# one square, one wide, one tall matrix whose transpose has the wide one's shape, and another square one: the
# step batches them as two groups, (16, 16) x 2 and (8, 24) x 2
SHAPES = [(16, 16), (8, 24), (24, 8), (16, 16)]


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


def reference_muon(params, grads_per_step, lr, wd, momentum):
    """The update as torch.optim.Muon documents it, one matrix at a time, in float64: the yardstick."""
    a, b, c = 3.4445, -4.7750, 2.0315
    params = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, buf, g in zip(params, bufs, grads):
            g = g.double()
            buf.mul_(momentum).add_(g, alpha=1 - momentum)
            update = (1 - momentum) * g + momentum * buf  # Nesterov
            X = update.T if update.shape[0] > update.shape[1] else update
            X = X / (X.norm() + 1e-7)
            for _ in range(5):
                A = X @ X.T
                X = a * X + (b * A + c * A @ A) @ X
            X = X.T if update.shape[0] > update.shape[1] else X
            p.mul_(1 - lr * wd).sub_(lr * math.sqrt(max(1, p.shape[0] / p.shape[1])) * X)
    return params


def run_ours(params, steps, lr=0.05, **kw):
    opt = Muon(params, lr=lr, weight_decay=0.1, **kw)
    grads = []
    for step in range(steps):
        set_grads(params, step)
        grads.append([p.grad.clone() for p in params])
        opt.step()
    return opt, grads


def test_newton_schulz_keeps_singular_vectors_and_squashes_singular_values():
    G = torch.randn(3, 32, 64, dtype=torch.float64)
    O = newton_schulz(G, dtype=torch.float64)
    for g, o in zip(G, O):
        U, S, Vh = torch.linalg.svd(g, full_matrices=False)
        M = U.T @ o @ Vh.T  # diagonal when O shares G's singular vectors
        assert torch.allclose(M - torch.diag(M.diagonal()), torch.zeros_like(M), atol=1e-8)
        assert M.diagonal().min() > 0.6 and M.diagonal().max() < 1.25  # ~1: the orthogonal factor
    tall = torch.randn(2, 64, 32, dtype=torch.float64)
    assert torch.allclose(newton_schulz(tall, dtype=torch.float64), newton_schulz(tall.mT, dtype=torch.float64).mT)


@pytest.mark.parametrize("ns_dtype", ["float32", "float64"])
def test_update_matches_float64_reference(ns_dtype):
    params = make_params(torch.float64 if ns_dtype == "float64" else torch.float32)
    start = [p.detach().clone() for p in params]
    opt, grads = run_ours(params, 3, ns_dtype=ns_dtype)
    expected = reference_muon(start, grads, lr=0.05, wd=0.1, momentum=0.95)
    tol = 1e-10 if ns_dtype == "float64" else 2e-5
    for p, e in zip(params, expected):
        assert torch.allclose(p.double(), e, atol=tol, rtol=0), (p.double() - e).abs().max()
    assert opt.param_groups[0]["ns_dtype"] == ns_dtype


def test_agrees_with_torch_optim_muon():
    """torch.optim.Muon runs Newton-Schulz in bfloat16: the same update, to bfloat16's precision."""
    ours, theirs = make_params(), make_params()
    opt = torch.optim.Muon(theirs, lr=0.05, weight_decay=0.1)
    for step in range(3):
        set_grads(theirs, step)
        opt.step()
    run_ours(ours, 3, ns_dtype="float32")
    start = make_params()
    for a, b, s in zip(ours, theirs, start):
        moved = (a - s).norm()
        assert (a - b).norm() < 0.02 * moved


def test_found_inf_skips_the_step_on_the_device():
    params = make_params()
    opt, _ = run_ours(params, 2, ns_dtype="float32")
    before = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(params, bufs))
    set_grads(params, 7)
    opt.found_inf = torch.tensor(0.0)  # a good step with the flag present is an ordinary step
    opt.step()
    twin = [torch.nn.Parameter(b.clone()) for b in before]
    twin_opt = Muon(twin, lr=0.05, weight_decay=0.1, ns_dtype="float32")
    twin_opt.load_state_dict(opt.state_dict())  # the same momenta
    for p, b in zip(twin, bufs):
        twin_opt.state[p]["momentum_buffer"].copy_(b)
    set_grads(twin, 7)
    twin_opt.step()
    assert all(torch.allclose(p, t, atol=1e-7, rtol=0) for p, t in zip(params, twin))


def test_tensor_lr_equals_float_lr():
    a, b = make_params(), make_params()
    run_ours(a, 2, ns_dtype="float32")
    run_ours(b, 2, lr=torch.tensor(0.05), ns_dtype="float32")
    assert all(torch.allclose(x, y, atol=1e-7, rtol=0) for x, y in zip(a, b))


def test_loads_a_torch_optim_muon_state():
    params = make_params()
    theirs = torch.optim.Muon(params, lr=0.05, weight_decay=0.1)
    set_grads(params, 0)
    theirs.step()
    ours = Muon(params, lr=0.05, weight_decay=0.1)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.state[params[0]]["momentum_buffer"], theirs.state[params[0]]["momentum_buffer"])
    set_grads(params, 1)
    ours.step()  # decides its Newton-Schulz precision, which the torch state does not carry
    assert ours.param_groups[0]["ns_dtype"] in ("float32", "bfloat16")


def test_refuses_non_matrices():
    with pytest.raises(ValueError, match="2-D matrices only"):
        Muon([torch.nn.Parameter(torch.ones(4))])


def test_bf16_only_where_it_is_fast(monkeypatch):
    monkeypatch.setattr(model, "_cpu_fast_bf16", None)  # undecided, as in a fresh process
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert fast_bf16_matmul("cpu") is False  # bf16 is emulated there: several times slower than float32
    assert fast_bf16_matmul("mps") is False


def test_cpu_bf16_verdict_is_measured_once_or_set(monkeypatch):
    """The CPU's verdict is measured once per process (training's dtype and Muon's precision then agree); once set
    (as train.py sets rank 0's in every process under torchrun) it is taken as it is, with no measurement."""
    measured = []
    monkeypatch.setattr(model, "_cpu_fast_bf16", None)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(model, "_cpu_bf16_matmul_wins", lambda: measured.append(1) or True)
    assert fast_bf16_matmul("cpu") is True and fast_bf16_matmul("cpu") is True and len(measured) == 1
    set_cpu_fast_bf16(False)
    assert fast_bf16_matmul("cpu") is False and len(measured) == 1


def test_bf16_measurement_where_the_cpu_emulates_it():
    """The measurement behind dtype="auto" on a CPU and Muon's precision, in a fresh process where oneDNN may use
    AVX2 only (as on an AVX2 CPU, where bf16 is emulated: ~30x slower than float32 on an AVX512 machine): bf16
    loses, and the thread count it timed on one thread with is restored."""
    code = ("import torch, model; n = torch.get_num_threads(); "
            "print(model._cpu_bf16_matmul_wins(), torch.get_num_threads() == n)")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.stdout.split() == ["False", "True"], r.stdout + r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_needs_no_host_sync_and_is_capturable():
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    opt = Muon(params, lr=torch.tensor(0.05, device="cuda"), weight_decay=0.1)
    opt.found_inf = torch.zeros((), device="cuda")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step allocates the state and decides the precision (bf16 on this GPU)
    assert opt.param_groups[0]["ns_dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        opt.step()
    before = [p.detach().clone() for p in params]
    opt.found_inf.fill_(1.0)
    graph.replay()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    opt.found_inf.fill_(0.0)
    graph.replay()
    assert not all(torch.equal(p, b) for p, b in zip(params, before))
