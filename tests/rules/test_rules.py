"""Every layer rule and the models researchers train, against a per-sample autograd oracle (float64).

The oracle: one forward pass of an untouched copy of the model (same seed, so the same
dropout masks), then the per-sample gradient of each tracked weight by
``autograd.grad(losses[i], weight)`` for every sample i, and
:func:`sdelip.core.formulas.layer_terms` on those. The tracker's factored engine must agree
to 1e-10 relative on every term of every tracked weight, and no weight matrix of these
models may be skipped (or recorded as zero) without an error.
"""

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sdelip import DegenerateSpectrumError
from sdelip.core.formulas import layer_terms
from sdelip.engines import EngineError, SharedTensorWarning
from sdelip.rules.inventory import UnsupportedLayerError, tracked_layers, weight_inventory
from sdelip.rules import BatchAxisError, rule_for
from sdelip.tracking.options import RuntimeOptions
from sdelip.tracking.tracker import Tracker

DT = torch.float64
LR = 0.05
CE = functools.partial(F.cross_entropy, reduction="none")
TERMS = ("K", "drift", "noise_curvature", "noise_curvature_var", "noise_curvature_cov", "diffusion_sq", "gap")


def rel_close(a, b, rtol=1e-10, atol=1e-14):
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + atol


def oracle(model, inputs, targets, loss=CE, seed=0):
    """layer_terms on per-sample gradients by an autograd loop over the samples of one forward."""
    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    losses = loss(m(*inputs), targets)
    out = {}
    for layer in tracked_layers(m):
        W = layer.weight
        G = torch.stack([layer.rule.matrix(torch.autograd.grad(losses[i], W, retain_graph=True)[0])
                         for i in range(len(losses))])
        out[layer.name] = layer_terms(layer.matrix().detach(), G, LR, split=True)
    return out


def tracked(model, inputs, targets, loss=CE, seed=0, before_backward=None, **kw):
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    tr = Tracker(m, opt, engine="factored", **kw)
    torch.manual_seed(seed)
    losses = loss(m(*inputs), targets)
    if before_backward is not None:
        before_backward(m, losses)
    row = tr.backward(losses).as_row()
    tr.close()
    return row, tr


def check(model, inputs, targets, loss=CE, names=None, rtol=1e-10, **kw):
    row, tr = tracked(model, inputs, targets, loss, **kw)
    want = oracle(model, inputs, targets, loss)
    if names is not None:
        assert [l.name for l in tr.layers] == names
    assert set(want) == {l.name for l in tr.layers}
    # every trainable weight matrix of the model is tracked, or left out as a normalisation scale, by name
    tracked_params = set()
    for l in tr.layers:
        for module, attr, _ in l.users:
            tracked_params.add(id(module.get_submodule(attr.rpartition(".")[0]) if "." in attr else module))
    names = {l.parameter_name for l in tr.layers}
    left = {o["name"]: o["reason"] for o in tr.metadata["left_out"]}
    for pname, p in model.named_parameters():
        if p.ndim >= 2 and pname not in names:
            assert "normalisation" in left.get(pname, ""), f"{pname} {tuple(p.shape)} is neither tracked nor listed"
        if p.ndim < 2:
            assert pname in left, f"{pname} is not listed as left out"
    for name, t in want.items():
        pairs = {"K": t.sigma1, "drift": t.drift, "noise_curvature": t.noise_curvature,
                 "diffusion_sq": t.diffusion_sq, "gap": t.gap, "noise_curvature_var": t.noise_curvature_var,
                 "noise_curvature_cov": t.noise_curvature_cov}
        assert float(t.diffusion_sq) > 0, f"{name}: the oracle itself is zero, the test could not fail"
        for q, v in pairs.items():
            assert rel_close(row[f"{q}/{name}"], float(v), rtol), (q, name, row[f"{q}/{name}"], float(v))
    return row, tr


# -- models ---------------------------------------------------------------------------------------
class TransformerClassifier(nn.Module):
    def __init__(self, d=8, heads=2, layers=2, vocab=11, classes=3, batch_first=True, dropout=0.1, T=5):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(T, d)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=dropout, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):  # tokens (M, T)
        T = tokens.shape[1]
        h = self.embed(tokens) + self.pos(torch.arange(T, device=tokens.device))
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


class GPTBlock(nn.Module):
    """Token + position embeddings, a causal self-attention block, an MLP, the head tied to the embedding."""

    def __init__(self, vocab=13, d=8, T=6):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, dropout=0.1, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, tokens):
        T = tokens.shape[1]
        h = self.tok(tokens) + self.pos(torch.arange(T))
        a = self.ln1(h)
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        h = h + self.proj(F.gelu(self.fc(self.ln2(h))))
        return self.head(h)  # (M, T, vocab)


def lm_loss(logits, targets):  # per-sample mean over the positions
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)


def tokens(M, T, vocab, seed, pad=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (M, T), generator=g)
    if pad is not None:
        x[:, -2:] = pad  # padded tail
        x[0, 0] = pad
    return x


# -- whole models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("M", [5, 4])  # M = T = 5 makes the sequence-first axes indistinguishable by size
def test_transformer_encoder_classifier(batch_first, M):
    torch.manual_seed(0)
    model = TransformerClassifier(batch_first=batch_first).to(DT).train()
    x = tokens(M, 5, 11, seed=1, pad=0)
    y = torch.randint(0, 3, (M,), generator=torch.Generator().manual_seed(2))
    names = ["embed", "pos"] + [f"enc.layers.{k}.{w}" for k in range(2)
                                 for w in ("self_attn.in_proj_weight", "self_attn.out_proj", "linear1", "linear2")]
    check(model, (x,), y, names=names + ["head"])


def test_multihead_attention_kdim_vdim_and_cross_attention():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(3, 6)
            self.attn = nn.MultiheadAttention(6, 3, kdim=4, vdim=5, batch_first=True)
            self.self_kv = nn.MultiheadAttention(6, 2, batch_first=True)  # key is value, query differs
            self.head = nn.Linear(6, 3)

        def forward(self, x, k, v):
            q = torch.tanh(self.q(x))
            h = self.attn(q, k, v)[0]
            h = h + self.self_kv(h, q, q)[0]
            return self.head(h.mean(1))

    torch.manual_seed(1)
    model = Cross().to(DT)
    g = torch.Generator().manual_seed(3)
    M = 4
    x, k, v = (torch.randn(M, 3, 3, generator=g, dtype=DT), torch.randn(M, 4, 4, generator=g, dtype=DT),
               torch.randn(M, 4, 5, generator=g, dtype=DT))
    y = torch.randint(0, 3, (M,), generator=g)
    check(model, (x, k, v), y, names=["q", "attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                                      "attn.out_proj", "self_kv.in_proj_weight", "self_kv.out_proj", "head"])


def test_gpt_block_with_tied_embedding_and_head():
    torch.manual_seed(2)
    model = GPTBlock().to(DT).train()
    x = tokens(4, 6, 13, seed=4)
    y = tokens(4, 6, 13, seed=5)
    row, tr = check(model, (x,), y, loss=lm_loss, example_input=x)
    tok = next(l for l in tr.layers if l.name == "tok")
    assert tok.aliases == ("head",) and tok.uses == 2 and tok.rules[0].name == "embedding"


def test_conv1d_conv3d_and_depthwise_conv2d():
    class Convs(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=1)
            self.c1b = nn.Conv1d(4, 4, 2, padding="same", padding_mode="reflect", groups=2)
            self.c3 = nn.Conv3d(1, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2))
            self.dw = nn.Conv2d(3, 6, 3, padding=1, groups=3, stride=2)  # depthwise (multiplier 2)
            self.head = nn.Linear(4 + 6, 3)

        def forward(self, a, b):
            h1 = torch.tanh(self.c1b(torch.tanh(self.c1(a)))).mean(-1)
            h3 = torch.tanh(self.c3(b)).mean(2)  # (M, 3, H', W')
            h2 = torch.tanh(self.dw(h3)).mean((-1, -2))
            return self.head(torch.cat([h1, h2], 1))

    torch.manual_seed(3)
    model = Convs().to(DT)
    g = torch.Generator().manual_seed(6)
    M = 5
    a, b = torch.randn(M, 2, 9, generator=g, dtype=DT), torch.randn(M, 1, 4, 7, 6, generator=g, dtype=DT)
    y = torch.randint(0, 3, (M,), generator=g)
    check(model, (a, b), y, names=["c1", "c1b", "c3", "dw", "head"])


def test_embedding_padding_idx_and_repeated_indices():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4, padding_idx=2)
            self.head = nn.Linear(4, 3)

        def forward(self, t):
            return self.head(torch.tanh(self.emb(t)).sum(1))

    torch.manual_seed(4)
    model = Bag().to(DT)
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 7, (6, 9), generator=g)  # repeated indices within a sample, padding_idx present
    t[:, 0] = 2
    y = torch.randint(0, 3, (6,), generator=g)
    check(model, (t,), y)
    with pytest.raises(ValueError, match="'emb' has scale_grad_by_freq=True"):
        weight_inventory(Chain(emb=nn.Embedding(5, 3, scale_grad_by_freq=True)))
    with pytest.raises(ValueError, match="'emb' has max_norm=1.0"):
        weight_inventory(Chain(emb=nn.Embedding(5, 3, max_norm=1.0)))


class Chain(nn.Module):
    """Named modules applied in order (tanh between them), the last one's output averaged over any extra axes."""

    def __init__(self, reduce_tokens=False, **mods):
        super().__init__()
        self.reduce_tokens = reduce_tokens
        for k, v in mods.items():
            setattr(self, k, v)

    def forward(self, x):
        mods = list(self.children())
        for k, mod in enumerate(mods):
            x = mod(x)
            if k < len(mods) - 1:
                x = torch.tanh(x)
            if self.reduce_tokens and k == 0:
                x = x.mean(1)
        return x


def test_sequence_first_linear_with_M_equal_T_uses_the_probe():
    """(T, M, d) activations with T = M: the batch axis is found by the probe, not guessed as dim 0."""
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 3)

        def forward(self, x):  # x (M, T, 3) → seq-first inside
            h = torch.tanh(self.a(x.transpose(0, 1)))
            h = h.cumsum(0)  # mixes positions (not samples): dim 0 must not be taken for the batch
            return self.b(h).mean(0)

    torch.manual_seed(5)
    model = SeqFirst().to(DT)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(4, 4, 3, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g)
    row, tr = check(model, (x,), y)
    assert set(tr.engine._axis_cache.values()) == {1}


def test_no_axis_with_the_samples_is_computed_exactly():
    """Samples flattened together, or a tensor shared by all samples: per-sample output gradients, still exact."""
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.shared = nn.Linear(2, 3)  # applied to a constant shared by every sample (broadcast)

        def forward(self, x):  # (M, T, 3) flattened to (M·T, 3): no axis carries the samples
            h = self.a(x.reshape(-1, 3)).reshape(x.shape)
            return (torch.tanh(h) * self.shared(torch.ones(x.shape[1], 2, dtype=x.dtype))).mean(1)

    torch.manual_seed(11)
    model = Flat().to(DT)
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(4, 3, 3, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g)
    with pytest.warns(SharedTensorWarning, match="layer 'a': its output at step 0 does not carry the M = 4 samples"):
        row, tr = check(model, (x,), y)
    assert set(tr.engine._axis_cache.values()) == {-1}


def test_a_convolution_with_mixed_samples_is_an_error_naming_the_layer():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(2, 3, 2)

        def forward(self, x):  # the samples are mixed before the convolution
            return self.c(x + x.mean(0, keepdim=True)).mean(-1)

    model = Mixed().to(DT)
    x, y = torch.randn(4, 2, 5, dtype=DT), torch.randint(0, 3, (4,))
    row, _ = tracked(model, (x,), y)  # the convolution's output still carries the samples on axis 0
    want = oracle(model, (x,), y)
    assert rel_close(row["diffusion_sq/c"], float(want["c"].diffusion_sq))

    class Flattened(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(2, 3, 1)

        def forward(self, x):  # (M, 2, 5) → one batch of M·... positions: the samples on no axis
            h = self.c(x.transpose(0, 1).reshape(1, 2, -1))
            return h.reshape(3, x.shape[0], -1).mean(-1).T

    model = Flattened().to(DT)
    with pytest.raises(BatchAxisError, match=r"layer 'c' at step 0: its conv rule needs the M = 4 samples"):
        tracked(model, (x,), y)


def test_extra_autograd_grad_before_the_trackers_backward():
    """Gradient-norm logging with retain_graph=True does not consume the hooks: the same numbers as without."""
    torch.manual_seed(6)
    model = TransformerClassifier(batch_first=True, dropout=0.0).to(DT)
    x = tokens(4, 5, 11, seed=9)
    y = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(10))

    def log_grad_norm(m, losses):
        gs = torch.autograd.grad(losses.mean(), list(m.parameters()), retain_graph=True, allow_unused=True)
        assert sum(float(g.norm()) for g in gs if g is not None) > 0

    plain, _ = tracked(model, (x,), y)
    row, _ = tracked(model, (x,), y, before_backward=log_grad_norm)
    want = oracle(model, (x,), y)
    for name, t in want.items():
        assert rel_close(row[f"drift/{name}"], float(t.drift)) and row[f"diffusion_sq/{name}"] > 0
        for q in TERMS:
            assert rel_close(row[f"{q}/{name}"], plain[f"{q}/{name}"]), (q, name)


def test_a_functional_use_the_hooks_cannot_see_is_an_error():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x) + F.linear(x, self.a.weight)  # a second, unseen application

    model = Sneaky().to(DT)
    x, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    with pytest.raises(EngineError, match=r"layer 'a' at step 0: the per-sample gradients seen by its rule's hooks"):
        tracked(model, (x,), y)


class Gated(nn.Module):
    """A custom module with a raw weight matrix and no rule: the per-module fallback."""

    def __init__(self, d=4):
        super().__init__()
        self.W = nn.Parameter(torch.randn(d, d) / d)
        self.gain = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return torch.tanh(x @ self.W.T) * self.gain


def test_per_module_fallback_is_exact_and_unsupported_error_refuses_by_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.gated = Gated()
            self.bil = nn.Bilinear(4, 4, 3)

        def forward(self, x):
            h = self.gated(torch.tanh(self.inp(x)))
            return self.bil(h, h)

    torch.manual_seed(7)
    model = Net().to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 3, (5,))
    row, tr = check(model, (x,), y, names=["inp", "gated.W", "bil"])
    assert [l.rule.name for l in tr.layers] == ["linear", "fallback", "fallback"]
    assert {"name": "gated.gain", "shape": [4], "reason": "a vector (scale/shift), not part of θ (Prop 9)"} in \
        tr.metadata["left_out"]
    with pytest.raises(UnsupportedLayerError, match=r"the weight matrix 'gated.W' \(4, 4\) of Gated has no layer rule"):
        Tracker(copy.deepcopy(model), None, lr=LR, runtime=RuntimeOptions(unsupported="error"))


def test_fallback_refuses_random_operations_by_name():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            return F.dropout(x @ self.W.T, 0.5, self.training)

    model = Chain(n=Noisy(), head=nn.Linear(3, 3)).to(DT)
    x, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    with pytest.raises(EngineError, match="Noisy module draws random numbers"):
        tracked(model, (x,), y)


def test_metadata_lists_tracked_and_left_out_and_info_shows_them(tmp_path):
    from sdelip.cli import main

    torch.manual_seed(8)
    model = TransformerClassifier(layers=1, dropout=0.0).to(DT)
    path = tmp_path / "tr.db"
    x = tokens(4, 5, 11, seed=11)
    y = torch.randint(0, 3, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with Tracker(model, opt, record=path) as tr:
        tr.backward(CE(model(x), y))
    meta = tr.metadata
    assert [l["name"] for l in meta["layers"]][2] == "enc.layers.0.self_attn.in_proj_weight"
    norm = "an elementwise scale or shift of a normalisation layer, not part of θ (Prop 9)"
    assert {"name": "enc.layers.0.norm1.weight", "shape": [8], "reason": norm} in meta["left_out"]
    import io
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["info", str(path)])
    text = buf.getvalue()
    assert "enc.layers.0.self_attn.in_proj_weight" in text and "left out" in text and "norm1.weight" in text


LAYER_TYPE_TEST = r"isinstance\([^)]*nn\.(Linear|Conv[123]d|Embedding|MultiheadAttention|BatchNorm|modules\.batchnorm)"


def test_registry_is_the_only_place_that_knows_layer_types():
    import pathlib
    import re

    import sdelip

    root = pathlib.Path(sdelip.__file__).parent
    offenders = []
    for p in root.rglob("*.py"):
        if "rules" in p.parts:
            continue
        for k, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(LAYER_TYPE_TEST, line):
                offenders.append(f"{p.relative_to(root)}:{k}")
    assert not offenders, offenders
    assert rule_for(nn.Conv1d(1, 1, 1)).name == "conv" and rule_for(nn.Bilinear(2, 2, 2)) is None
    assert rule_for(nn.LSTM(2, 2)).name == "recurrent"  # issue 27


# -- Hypothesis over shapes and options ------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(
    nd=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2]),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, "same"]),
    mode=st.sampled_from(["zeros", "reflect", "circular"]),
    M=st.integers(2, 4),
    split=st.booleans(),
)
def test_conv_rule_against_autograd(nd, groups, k, stride, dilation, padding, mode, M, split):
    if padding == "same":
        stride = 1
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    conv = conv_cls(2 * groups, 2 * groups, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    padding_mode=mode).to(DT)
    size = (6,) * nd if nd < 3 else (5, 6, 5)  # at least the dilated kernel (5)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(2), _Mean(), nn.Linear(2 * groups, 3)).to(DT)
    g = torch.Generator().manual_seed(nd * 100 + k)
    x = torch.randn(M, 2 * groups, *size, generator=g, dtype=DT)
    y = torch.randint(0, 3, (M,), generator=g)
    row, _ = tracked(model, (x,), y, split=split)
    want = oracle(model, (x,), y)
    for q in ("K", "drift", "noise_curvature", "diffusion_sq") + (("noise_curvature_var",) if split else ()):
        assert rel_close(row[f"{q}/0"], float(getattr(want["0"], _attr(q))), 1e-9), q


class _Mean(nn.Module):
    def forward(self, x):
        return x.mean(-1)


def _attr(q):
    return "sigma1" if q == "K" else q


@settings(max_examples=10, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), axis=st.integers(0, 2), M=st.integers(2, 4),
       n=st.integers(1, 4), m=st.integers(1, 4))
def test_linear_rule_on_any_leading_axes(lead, axis, M, n, m):
    axis = min(axis, len(lead))
    shape = list(lead)
    shape.insert(axis, M)

    class AnyAxes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(n, m)
            self.b = nn.Linear(m, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x)).movedim(axis, 0).reshape(M, -1, m).mean(1)
            return self.b(h)

    torch.manual_seed(9)
    model = AnyAxes().to(DT)
    g = torch.Generator().manual_seed(M * 10 + n)
    x = torch.randn(*shape, n, generator=g, dtype=DT)
    y = torch.randint(0, 3, (M,), generator=g)
    row, _ = tracked(model, (x,), y)
    want = oracle(model, (x,), y)
    for q in ("drift", "noise_curvature", "diffusion_sq", "noise_curvature_var"):
        assert rel_close(row[f"{q}/a"], float(getattr(want["a"], q)), 1e-9), q


@settings(max_examples=10, deadline=None)
@given(V=st.integers(2, 9), d=st.integers(1, 4), T=st.integers(1, 5), M=st.integers(2, 4),
       pad=st.one_of(st.none(), st.integers(0, 1)))
def test_embedding_rule_against_autograd(V, d, T, M, pad):
    model = Chain(reduce_tokens=True, emb=nn.Embedding(V, d, padding_idx=pad), head=nn.Linear(d, 3)).to(DT)
    g = torch.Generator().manual_seed(V * 7 + T)
    t = torch.randint(0, V, (M, T), generator=g)
    y = torch.randint(0, 3, (M,), generator=g)
    row, _ = tracked(model, (t,), y)
    want = oracle(model, (t,), y)
    for q in ("drift", "noise_curvature", "diffusion_sq", "noise_curvature_var", "noise_curvature_cov"):
        v = float(getattr(want["emb"], q))
        assert rel_close(row[f"{q}/emb"], v, 1e-9, atol=1e-13), q
    assert np.isfinite(row["K/emb"])


@pytest.mark.parametrize("engine", ["materialised", "coupled"])
def test_the_vectorised_engines_agree_on_the_gpt_block(engine):
    """Without dropout every engine sees the same per-sample losses: the rules' factored numbers = torch.func's."""
    torch.manual_seed(12)
    model = GPTBlock().to(DT)
    model.attn.dropout = 0.0
    x, y = tokens(4, 6, 13, seed=13), tokens(4, 6, 13, seed=14)
    fac, _ = tracked(model, (x,), y, loss=lm_loss, example_input=x)
    m = copy.deepcopy(model)
    tr = Tracker(m, None, lr=LR, engine=engine, loss_fn=lm_loss, example_input=x)
    row = tr.backward(lm_loss(m(x), y), batch=(x, y)).as_row()
    for name in (l.name for l in tr.layers):
        for q in TERMS:
            assert rel_close(row[f"{q}/{name}"], fac[f"{q}/{name}"], 1e-9), (engine, q, name)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "vit"])
def test_torchvision_models_are_exact(name):
    """Models nobody here designed: every weight matrix exact against the oracle, or listed (eval mode: BatchNorm
    with running statistics, no dropout draws)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(13)
    if name == "vit":  # torchvision's EncoderBlock applies nn.MultiheadAttention; class token, positions: fallback
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                     hidden_dim=8, mlp_dim=16, num_classes=4)
        # torchvision zero-initialises these: σ1 = 0 is refused by name (the operator norm is not differentiable)
        model = model.to(DT).eval()
        g = torch.Generator().manual_seed(14)
        x, y = torch.randn(3, 3, 32, 32, generator=g, dtype=DT), torch.tensor([0, 1, 3])
        zero = r"the top singular value for layer '(class_token|heads\.head)' at step 0 is 0\.0"
        with pytest.raises(DegenerateSpectrumError, match=zero):
            tracked(model, (x,), y)
        nn.init.normal_(model.class_token, std=0.3)
        nn.init.normal_(model.heads.head.weight, std=0.3)
    else:
        model = getattr(torchvision.models, name)(num_classes=4).to(DT).eval()
    g = torch.Generator().manual_seed(14)
    x, y = torch.randn(3, 3, 32, 32, generator=g, dtype=DT), torch.tensor([0, 1, 3])
    row, tr = check(model, (x,), y, rtol=1e-9)
    if name == "vit":
        assert {l.rule.name for l in tr.layers} == {"attention", "conv", "fallback", "linear"}
