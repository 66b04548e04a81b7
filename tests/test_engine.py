"""The sampling engine against naive full-recompute decoding, full forward passes and transformers."""

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from shoggoth.lm import kernels, sampling, tokenizer
from shoggoth.lm.checkpoint import save_pretrained
from shoggoth.lm.engine import Engine, sample
from shoggoth.lm.model import GPT, GPTConfig, apply_rope
from shoggoth.lm.packed import PackedWeights

V = 97
PROMPTS = [[3, 14, 15, 92, 65], [35], [89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50]]  # ragged on purpose


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64)).eval()
    # Large random weights spread the logits, so greedy choices are not near-ties.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["cpu", "cpu sdpa", "cpu static", pytest.param("cuda graph", marks=CUDA)])
def variant(request, monkeypatch):
    """Where and how the engine decodes: on CPU with the packed decode step and shoggoth's
    attention kernel; the same with PyTorch's SDPA (where the kernel cannot be built);
    on CPU with the static-cache step that CUDA graphs replay (run eagerly there); and on
    a CUDA GPU with the graph itself (skipped without a GPU; run on a lent H100, see
    bench/RESULTS.md)."""
    if request.param == "cpu sdpa":
        monkeypatch.setattr(kernels, "load", lambda: None)
    return request.param


def on(model, variant):
    """The model where the variant runs (a copy on the GPU for CUDA) and its engine's keyword arguments."""
    if variant == "cuda graph":
        return copy.deepcopy(model).cuda(), {}
    return model, dict(static=variant == "cpu static")


def cpu(gen):
    return type(gen)(gen.tokens.cpu(), gen.mask.cpu(), gen.logprobs.cpu())


def naive_greedy(model, prompt, n):
    """Greedy decoding the slow, obvious way: the whole sequence through the model at every step."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(prompt):].tolist()


def reference_logprobs(logits, temperature, top_k, top_p):
    """log-probs (T, V) of the distribution each row samples from, one row at a time with plain Python."""
    out = []
    for row in (logits / temperature).tolist():
        order = sorted(range(len(row)), key=lambda i: -row[i])
        keep = order[:top_k] if top_k else order
        probs = torch.tensor([row[i] for i in keep]).softmax(0).tolist()
        kept, total = [], 0.0
        for i, p in zip(keep, probs):
            if total >= top_p:
                break
            kept.append(i)
            total += p
        masked = torch.full((len(row),), float("-inf"))
        masked[kept] = torch.tensor([row[i] for i in kept])
        out.append(masked.log_softmax(0))
    return torch.stack(out)


@pytest.mark.slow
def test_greedy_matches_naive_recompute(model, variant):
    m, kw = on(model, variant)
    gen = cpu(Engine(m, **kw).generate(PROMPTS, max_new_tokens=20, temperature=0))
    assert gen.tokens.shape == gen.mask.shape == gen.logprobs.shape == (3, 20)
    assert gen.mask.all()
    for i, p in enumerate(PROMPTS):
        assert gen.tokens[i].tolist() == naive_greedy(model, p, 20), f"row {i}"
        # Greedy log-probs are those of the plain temperature-1 softmax.
        seq = torch.tensor([p + gen.tokens[i].tolist()], device=m.lm_head.weight.device)
        with torch.no_grad():
            logp = m(seq)[0, len(p) - 1:-1].log_softmax(-1).cpu()
        want = logp.gather(-1, gen.tokens[i][:, None])[:, 0]
        torch.testing.assert_close(gen.logprobs[i], want, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.7)])
def test_logprobs_match_full_forward(model, temperature, top_k, top_p, variant):
    m, kw = on(model, variant)
    gen = cpu(Engine(m, **kw).generate(PROMPTS, max_new_tokens=24, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=1))
    for i, p in enumerate(PROMPTS):
        new = gen.tokens[i][gen.mask[i]]
        seq = torch.tensor([p + new.tolist()], device=m.lm_head.weight.device)
        with torch.no_grad():
            logits = m(seq)[0, len(p) - 1:-1].cpu()
        logp = reference_logprobs(logits, temperature, top_k, top_p)
        want = logp.gather(-1, new[:, None])[:, 0]
        assert torch.isfinite(want).all(), "sampled a token outside the top-k/top-p set"
        assert (gen.logprobs[i][~gen.mask[i]] == 0).all()
        torch.testing.assert_close(gen.logprobs[i][gen.mask[i]], want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_stop_ids_per_row(model, variant):
    m, kw = on(model, variant)
    full = Engine(m, **kw).generate(PROMPTS, max_new_tokens=16, temperature=0).tokens.tolist()
    stops = {full[0][2], full[1][6]}  # rows stop at different steps; any row may hit either id
    gen = cpu(Engine(m, **kw).generate(PROMPTS, max_new_tokens=16, temperature=0, stop_ids=stops))
    ends = [next((j + 1 for j, t in enumerate(row) if t in stops), 16) for row in full]
    assert len(set(ends)) > 1, "the test needs rows that stop at different steps"
    assert gen.tokens.shape[1] == max(ends)  # the batch stops once every row has
    for i, end in enumerate(ends):
        assert gen.mask[i].tolist() == [j < end for j in range(max(ends))]
        assert gen.tokens[i, :end].tolist() == full[i][:end]  # the stop token itself is real
        assert (gen.tokens[i, end:] == 0).all() and (gen.logprobs[i, end:] == 0).all()
        assert (gen.logprobs[i, :end] < 0).all()


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(model, variant):
    m, kw = on(model, variant)
    engine = Engine(m, **kw)
    a = engine.generate(PROMPTS, max_new_tokens=20, temperature=1.5, seed=7)
    b = engine.generate(PROMPTS, max_new_tokens=20, temperature=1.5, seed=7)
    c = engine.generate(PROMPTS, max_new_tokens=20, temperature=1.5, seed=8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_top_k_1_is_greedy(model):
    engine = Engine(model)
    greedy = engine.generate(PROMPTS, max_new_tokens=12, temperature=0)
    top1 = engine.generate(PROMPTS, max_new_tokens=12, temperature=1.0, top_k=1, seed=3)
    assert torch.equal(top1.tokens, greedy.tokens)
    assert (top1.logprobs == 0).all()  # one candidate: probability 1


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.75)])
def test_sampled_frequencies_match_the_distribution(temperature, top_k, top_p):
    # 40,000 draws from one row of logits: each token's frequency within 0.01 of the
    # probability that sample() reports for it (standard error here is at most 0.0025),
    # and tokens that top-k/top-p cut are never drawn. Token 5 underflows to probability 0.
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -200.0]]).repeat(40_000, 1)
    tok, lp = sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(0))
    want = reference_logprobs(logits[:1], temperature, top_k, top_p)[0].exp()
    freq = torch.bincount(tok, minlength=6).float() / len(tok)
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)
    assert (freq[want == 0] == 0).all() and freq[5] == 0
    torch.testing.assert_close(lp, want[tok].log(), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_stream_yields_what_generate_returns(model, variant, bf16):
    # Under bf16 autocast, stream() leaves autocast between steps, which empties its cache
    # of cast weights: a CUDA graph must not read those (StaticStep casts inside the graph).
    m, kw = on(model, variant)
    engine = Engine(m, bf16=bf16, **kw)
    kw = dict(max_new_tokens=15, temperature=0.9, top_p=0.9, seed=5)
    row = engine.generate([PROMPTS[2]], **kw).tokens[0].tolist()
    assert list(engine.stream(PROMPTS[2], **kw)) == row
    stop = row[4]
    assert list(engine.stream(PROMPTS[2], **kw, stop_ids=[stop])) == row[:row.index(stop) + 1]


def test_bf16_autocast_logprobs(model, variant):
    # The bf16 path samples from bf16 logits; its log-probs match a bf16 autocast forward pass.
    m, kw = on(model, variant)
    gen = cpu(Engine(m, bf16=True, **kw).generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=0))
    assert gen.mask.all()
    dev = m.lm_head.weight.device
    for i, p in enumerate(PROMPTS):
        seq = torch.tensor([p + gen.tokens[i].tolist()], device=dev)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = m(seq)[0, len(p) - 1:-1].cpu()
        want = logits.float().log_softmax(-1).gather(-1, gen.tokens[i][:, None])[:, 0]
        torch.testing.assert_close(gen.logprobs[i], want, atol=0.1, rtol=0)


def test_training_mode_is_restored(model):
    model.train()
    try:
        Engine(model).generate(PROMPTS, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()
    Engine(model).generate(PROMPTS, max_new_tokens=2)
    assert not model.training


@pytest.mark.slow
def test_packed_weights_follow_the_model_and_leave_it_untouched(model):
    # The engine decodes through copies of the weights packed for oneDNN, made per generate
    # call: a policy trained between calls must be sampled with its new weights.
    m = copy.deepcopy(model)
    engine = Engine(m)
    before = engine.generate(PROMPTS, max_new_tokens=8, temperature=0).tokens
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    after = engine.generate(PROMPTS, max_new_tokens=8, temperature=0).tokens
    assert not torch.equal(before, after)
    for i, p in enumerate(PROMPTS):
        assert after[i].tolist() == naive_greedy(m, p, 8), f"row {i}"
    steps = engine.stream(PROMPTS[0], max_new_tokens=8)
    next(steps)  # a stream left half-read between steps
    patched = [name for name, mod in m.named_modules() if {"forward", "project"} & set(vars(mod))]
    assert patched == []
    m.train()
    x = torch.tensor([PROMPTS[2]])
    m(x, targets=x).backward()  # training still reaches every weight itself
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=True, tie_embeddings=False), dict(qk_norm=True, head_dim=24)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16 autocast", "bf16"])
@pytest.mark.parametrize("kernel", [True, False])
def test_decode_step_is_the_models_forward(kw, dtype, kernel, monkeypatch):
    # PackedWeights.decode writes the model's one-token forward out op for op: with it,
    # sampling gives the very tokens and log-probs that the model's modules give, with
    # shoggoth's attention kernel and with SDPA in its place.
    if not kernel:
        monkeypatch.setattr(kernels, "load", lambda: None)
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64, **kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(10).add_(0.1)  # norms and biases away from 1 and 0 too
    m = m.bfloat16() if dtype == "bf16" else m
    run = dict(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=0)
    fast = Engine(m, bf16=dtype == "bf16 autocast").generate(PROMPTS, **run)
    monkeypatch.setattr(PackedWeights, "decodes", staticmethod(lambda model: False))
    plain = Engine(m, bf16=dtype == "bf16 autocast").generate(PROMPTS, **run)
    assert torch.equal(fast.tokens, plain.tokens) and torch.equal(fast.logprobs, plain.logprobs)
    if dtype == "fp32":
        for i, p in enumerate(PROMPTS):
            assert Engine(m).generate([p], max_new_tokens=12, temperature=0).tokens[0].tolist() == naive_greedy(m, p, 12)


@pytest.mark.parametrize("D", [64, 128, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_kernel_matches_sdpa(D, dtype):
    # The kernel (shoggoth/lm/csrc/decode_attention.cpp) against SDPA in fp64 on the same
    # cache values: views narrowed out of a longer cache, grouped heads, left padding.
    assert kernels.load() is not None, "the kernel did not build (g++ and Python headers are test requirements)"
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S = 5, 8, 2, 37
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = (torch.randn(B, Hkv, 50, D, generator=g).to(dtype).narrow(2, 0, S) for _ in range(2))
    pad = torch.tensor([0, 3, 36, 1, 0])  # row 2 sees only its last key
    mask = (torch.arange(S)[None] >= pad[:, None])[:, None, None]  # (B, 1, 1, S)
    for m in (mask, None):
        got = kernels.decode_attention(q, k, v, m)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m, enable_gqa=True)
        assert got.dtype == torch.float32 and got.shape == (B, H, 1, D)
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    # A bf16 query is widened to fp32 (as SDPA's fp32 path would), not rounded further.
    got = kernels.decode_attention(q.bfloat16(), k, v, mask)
    want = F.scaled_dot_product_attention(q.bfloat16().double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("D", [64, 128, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_kernel_is_the_models_ops(D, dtype):
    # The fused call (RoPE, cache write, attention) against the model's own ops on the same
    # inputs, bit for bit: apply_rope, the copy into the cache, decode_attention.
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, pos = 5, 8, 2, 40, 29
    qkv = (torch.randn(B, (H + 2 * Hkv) * D, generator=g) * 3).to(dtype)
    trunk = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=H, n_kv_head=Hkv, n_embd=H * D, max_seq_len=64)).model
    cos, sin = (x.to(dtype) for x in trunk.rope(torch.randint(0, 64, (B,), generator=g)))  # (B, D)
    k, v = (torch.randn(B, Hkv, S, D, generator=g).to(dtype) for _ in range(2))
    valid = torch.rand(B, S, generator=g) > 0.3
    valid[:, pos] = True
    for mask in (valid, None):
        k2, v2 = k.clone(), v.clone()
        y = kernels.load().decode_step(qkv, cos, sin, k2, v2, pos, mask, H)
        qk = apply_rope(qkv[:, :(H + Hkv) * D].view(B, H + Hkv, D), cos[:, None], sin[:, None])
        k[:, :, pos], v[:, :, pos] = qk[:, H:], qkv[:, (H + Hkv) * D:].view(B, Hkv, D)
        assert torch.equal(k2, k) and torch.equal(v2, v)
        m = None if mask is None else mask[:, None, None, :pos + 1]
        want = kernels.decode_attention(qk[:, :H, None], k[:, :, :pos + 1], v[:, :, :pos + 1], m)
        assert torch.equal(y, want.view(B, H * D))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes_decode_with_sdpa(dtype):
    # The kernel takes fp32 and bf16; other models keep the SDPA path (and an fp32 cache).
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=32, max_seq_len=32)).eval().to(dtype)
    gen = Engine(m).generate(PROMPTS, max_new_tokens=6, temperature=0)
    assert gen.mask.all()
    assert gen.tokens[2].tolist() == naive_greedy(m, PROMPTS[2], 6)
    q = torch.randn(1, 2, 1, 16, requires_grad=True)
    k = v = torch.randn(1, 2, 5, 16)
    assert kernels.decode_attention(q.to(dtype), k.to(dtype), v.to(dtype)) is None
    assert kernels.decode_attention(q, k, v) is None  # autograd: SDPA, which has a backward
    with torch.no_grad():
        assert kernels.decode_attention(q, k, v) is not None


def test_stale_build_lock_is_cleared(tmp_path):
    # A build killed part-way leaves torch's lock file, on which every later build or load
    # would wait forever: one older than 5 minutes is removed. In a subprocess, with a
    # timeout, so that a regression fails instead of hanging the suite.
    ext = kernels.load()
    lock = Path(ext.__file__).parent / "lock"
    lock.touch()
    os.utime(lock, (time.time() - 600, time.time() - 600))
    code = "from shoggoth.lm import kernels; assert kernels.load() is not None"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert not lock.exists()


def test_attention_kernel_falls_back_to_sdpa(monkeypatch, capsys):
    # Where the kernel cannot be built (no compiler), the engine says so once and uses SDPA.
    from torch.utils import cpp_extension

    def fail(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(kernels, "_module", None)
    assert kernels.load() is None and kernels.load() is None
    err = capsys.readouterr().err
    assert err.count("kernel unavailable (RuntimeError: no C++ compiler); using PyTorch's SDPA") == 1
    m = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=32, max_seq_len=32)).eval()
    gen = Engine(m).generate(PROMPTS, max_new_tokens=5, temperature=0)
    assert gen.mask.all() and gen.tokens[0].tolist() == naive_greedy(m, PROMPTS[0], 5)
    monkeypatch.setenv("SHOGGOTH_NO_KERNELS", "1")
    assert kernels._build() is False


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=True, tie_embeddings=False), dict(qk_norm=True, head_dim=24)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_static_step_is_the_models_step(kw, device, dtype):
    # The static-cache step (the one CUDA graphs replay; eager on CPU) against the engine's
    # other path on the same device: every cached column written, the unwritten ones masked.
    # Sixteen ragged rows of 1 to 40 tokens, sampled.
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64, **kw)).eval()
    with torch.no_grad():
        for p in m.parameters():  # large weights spread the logits (bf16 would round them coarsely)
            p.mul_(10 if dtype == "fp32" else 1).add_(0.1)
    m = m.to(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in torch.randint(1, 41, (16,), generator=g)]
    # No top-p cut in bf16: a rounding there can move a token across the cut's edge.
    top_p = 0.95 if dtype == "fp32" else 1.0
    run = dict(max_new_tokens=20, temperature=0.9, top_p=top_p, seed=0)
    static = cpu(Engine(m, static=True).generate(prompts, **run))
    plain = cpu(Engine(m, static=False).generate(prompts, **run))
    if dtype == "fp32":
        assert torch.equal(static.tokens, plain.tokens) and torch.equal(static.mask, plain.mask)
        torch.testing.assert_close(static.logprobs, plain.logprobs, atol=1e-5, rtol=0)
    # In bf16 the two attention calls may round differently and part ways at a near-tie:
    # the static path's log-probs are checked against a full forward pass over its tokens.
    for i, p in enumerate(prompts):
        seq = torch.tensor([p + static.tokens[i].tolist()], device=device)
        with torch.no_grad():
            logits = m(seq)[0, len(p) - 1:-1].float().cpu()
        want = reference_logprobs(logits, 0.9, 0, top_p).gather(-1, static.tokens[i][:, None])[:, 0]
        torch.testing.assert_close(static.logprobs[i], want, atol=1e-4 if dtype == "fp32" else 0.1, rtol=0)


def test_bad_requests(model):
    engine = Engine(model)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[1], []])
    with pytest.raises(ValueError, match="context window"):
        engine.generate([[1] * 65])
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[1]], top_p=0)
    # The context window caps the new tokens: 60 + 4 = max_seq_len.
    assert Engine(model).generate([[1] * 60], max_new_tokens=10, temperature=0).tokens.shape == (1, 4)


@pytest.mark.slow
def test_greedy_matches_transformers_generate(model, tmp_path, variant):
    m, kw = on(model, variant)
    dev = m.lm_head.weight.device
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval().to(dev)
    P = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in PROMPTS], device=dev)
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in PROMPTS], device=dev)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=20, do_sample=False, pad_token_id=0,
                          eos_token_id=None)[:, P:].cpu()
    gen = cpu(Engine(m, **kw).generate(PROMPTS, max_new_tokens=20, temperature=0))
    for i in range(len(PROMPTS)):
        assert gen.tokens[i].tolist() == out[i].tolist(), f"row {i}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    lines = ["In the beginning God created the heaven and the earth.",
             "And the earth was without form, and void; and darkness was upon the face of the deep.",
             "And God said, Let there be light: and there was light."] * 20
    tok = tokenizer.train(lines, 300)
    tokenizer.save(tok, d)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, max_seq_len=64,
                    bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_pretrained(GPT(cfg), d, tokenizer_dir=d)
    return d


@pytest.mark.slow
def test_complete_and_cli_sample(model_dir):
    prompt = "And God said"
    kw = dict(max_new_tokens=12, temperature=0.8, top_k=50, top_p=1.0, seed=0)
    model, tok = sampling.load(model_dir)
    texts = sampling.complete((model, tok), [prompt, ""], **kw)
    # The same continuations straight from the engine, BOS prepended, stopping at end-of-text.
    gen = Engine(model).generate([[tok.bos_id] + tok.encode(prompt), [tok.bos_id]], stop_ids=[tok.eos_id], **kw)
    assert texts == [tok.decode(r[m].tolist()) for r, m in zip(gen.tokens, gen.mask)]
    assert texts[0] and texts[1]
    # The command line samples the prompt alone (the random stream depends on the batch).
    alone = sampling.complete(model_dir, [prompt], **kw)[0]
    out = subprocess.run([sys.executable, "-m", "shoggoth", "sample", str(model_dir), "--prompt", prompt,
                          "--max-new-tokens", "12", "--seed", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n" + "-" * 40)[0] == prompt + alone
