"""Broadcast uses (issue 27.1): tensors shared by every sample, broadcast over the batch, at the cost of a normal use.

A position table applied to ``arange(T)`` (Hugging Face GPT-2 and BERT as shipped), a class
token or a position table held as a bare ``nn.Parameter`` (timm's ViT): the factored engine
reads their per-sample gradients off the gradient of the add/sub/expand that broadcasts
them (:mod:`sdelip.rules.broadcast`), in the step's own backward. Every term is checked
against per-sample gradients by an autograd loop over the samples on an untouched copy
(float64, :func:`oracles.per_sample_terms`), and the route taken is asserted
(``FactoredEngine.routes``): "broadcast"/"parameter", not "batched backward" nor the
per-module fallback over the model.
"""

import copy
import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from oracles import per_sample_terms
from sdelip.errors import SharedTensorWarning
from sdelip.rules.broadcast import per_sample_gradient
from sdelip.tracking.tracker import Tracker

DT = torch.float64
LR = 0.05
CE = functools.partial(F.cross_entropy, reduction="none")


def track_one(model, losses_of, broadcast_uses=True):
    """One tracked step (factored engine) on a copy of ``model``: (record, tracker, warnings recorded)."""
    m = copy.deepcopy(model)
    tr = Tracker(m, torch.optim.SGD(m.parameters(), lr=LR), engine="factored")
    tr.engine.broadcast_uses = broadcast_uses
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = tr.backward(losses_of(m))
    tr.close()
    return rec, tr, caught


def assert_exact(rec, model, losses_of, layers, rtol=1e-8):
    want = per_sample_terms(model, losses_of, layers, LR)
    for name, terms in want.items():
        assert terms["diffusion_sq"] > 0, f"{name}: the oracle itself is zero, the test could not fail"
        for q, v in terms.items():
            got = rec.layers[name][q]
            assert math.isclose(got, v, rel_tol=rtol, abs_tol=1e-14), f"{q}/{name}: {got!r} vs oracle {v!r}"


def no_flood(caught):
    msgs = [str(w.message) for w in caught]
    assert not [m for m in msgs if "batching rule" in m], msgs
    assert not [w for w in caught if issubclass(w.category, SharedTensorWarning)], msgs


# -- the formula ---------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.data())
def test_per_sample_gradient_of_a_broadcast_is_the_autograd_loop(data):
    """∂(ℓ_i/M)/∂s from G = ∂(mean ℓ)/∂r for r = a + α s, a − α s or s.expand, s broadcast on any axes."""
    M = data.draw(st.integers(2, 4))
    shape_r = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    axis = data.draw(st.integers(0, len(shape_r)))
    shape_r.insert(axis, M)
    keep = data.draw(st.integers(0, len(shape_r) - 1))  # s drops this many leading axes
    shape_s = [1 if (k == axis or data.draw(st.booleans())) else n for k, n in enumerate(shape_r)][keep:]
    op = data.draw(st.sampled_from(["add", "sub", "expand", "radd"]))
    alpha = data.draw(st.sampled_from([1.0, 0.5, -2.0]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    s = torch.randn(shape_s, generator=g, dtype=DT, requires_grad=True)
    a = torch.randn(shape_r, generator=g, dtype=DT)
    w = torch.randn(shape_r, generator=g, dtype=DT)
    r = {"add": lambda: torch.add(a, s, alpha=alpha), "sub": lambda: torch.sub(a, s, alpha=alpha),
         "expand": lambda: s.expand(shape_r), "radd": lambda: s + a}[op]()
    factor = {"add": alpha, "sub": -alpha, "expand": 1.0, "radd": 1.0}[op]
    losses = (torch.tanh(r) * w).movedim(axis, 0).reshape(M, -1).sum(1)  # ℓ_i depends on r_i only
    G = torch.autograd.grad(losses.mean(), r, retain_graph=True)[0]
    D = per_sample_gradient(G, axis, tuple(shape_s), factor)
    want = torch.stack([torch.autograd.grad(losses[i] / M, s, retain_graph=True)[0] for i in range(M)])
    torch.testing.assert_close(D, want, rtol=1e-12, atol=1e-14)


# -- small models with every recognised broadcast ------------------------------------------------------
class Broadcasts(nn.Module):
    """Positions on arange(T) (1-D and with a size-1 batch axis), a class token, a pos table, learned queries."""

    def __init__(self, V=9, d=6, T=4, seq_first=False):
        super().__init__()
        self.seq_first = seq_first
        self.tok = nn.Embedding(V, d)
        self.pos = nn.Embedding(T, d)
        self.pos2d = nn.Embedding(T, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        # sequence-first: added to a (T+1, M, d) activation, the samples on axis 1 of the sum
        self.pos_embed = nn.Parameter(torch.randn(T + 1, 1, d) if seq_first else torch.randn(1, T + 1, d))
        self.offset = nn.Parameter(torch.randn(1, 1, d))  # size 1 on two axes of size M when T + 1 = M: probed
        self.queries = nn.Parameter(torch.randn(2, d))  # learned queries, subtracted with α = 0.5
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        M, T = ids.shape
        h = self.tok(ids) + self.pos(torch.arange(T))  # (T, d) broadcast: no batch axis at all
        h += self.pos2d(torch.arange(T)[None])  # (1, T, d), in place (BERT's pattern)
        h = torch.cat([self.cls_token.expand(M, -1, -1), h], 1)  # timm's pattern
        if self.seq_first:
            h = self.mix(h.transpose(0, 1) + self.pos_embed).transpose(0, 1)
        else:
            h = self.mix(h + self.pos_embed)
        h = h + self.offset
        q = torch.sub(h[:, :2], self.queries, alpha=0.5)
        return self.head(torch.tanh(torch.cat([q, h], 1)).mean(1))


@pytest.mark.parametrize("seq_first, T, M", [(False, 4, 5), (True, 4, 5), (False, 4, 3)])
def test_broadcast_uses_are_exact_on_the_batched_route(seq_first, T, M):
    torch.manual_seed(1)
    model = Broadcasts(T=T, seq_first=seq_first).to(DT)
    g = torch.Generator().manual_seed(2)
    ids, y = torch.randint(0, 9, (M, T), generator=g), torch.randint(0, 3, (M,), generator=g)
    losses_of = lambda m: CE(m(ids), y)  # noqa: E731
    rec, tr, caught = track_one(model, losses_of)
    routes = tr.engine.routes
    assert routes["pos"] == routes["pos2d"] == "broadcast"
    assert routes["cls_token"] == routes["pos_embed"] == routes["queries"] == routes["offset"] == "parameter"
    assert routes["tok"] == "embedding" and routes["mix"] == "linear"
    no_flood(caught)
    assert_exact(rec, model, losses_of, tr.layers)
    # the route before issue 27.1 (batched backward, per-module fallback over the model) gives the same terms
    before, tr0, caught0 = track_one(model, losses_of, broadcast_uses=False)
    assert tr0.engine.routes["pos"] == "batched backward" and tr0.engine.routes["cls_token"] == "fallback"
    assert any(issubclass(w.category, SharedTensorWarning) for w in caught0)
    for name in routes:
        for q in ("drift", "noise_curvature", "diffusion_sq"):
            assert math.isclose(rec.layers[name][q], before.layers[name][q], rel_tol=1e-9, abs_tol=1e-14)


def test_later_steps_reuse_the_probe_and_stay_exact():
    torch.manual_seed(3)
    model = Broadcasts().to(DT)
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    tr = Tracker(m, opt, engine="factored")
    g = torch.Generator().manual_seed(4)
    for M in (5, 5, 3):  # a smaller last batch: probed anew for its shapes
        ids, y = torch.randint(0, 9, (M, 4), generator=g), torch.randint(0, 3, (M,), generator=g)
        losses_of = lambda mm: CE(mm(ids), y)  # noqa: E731
        snapshot = copy.deepcopy(m)
        opt.zero_grad()
        rec = tr.backward(losses_of(m))
        assert tr.engine.routes["pos"] == "broadcast" and tr.engine.routes["pos_embed"] == "parameter"
        assert_exact(rec, snapshot, losses_of, tr.layers)
        opt.step()
    tr.close()


class Shift(nn.Module):
    def __init__(self, T, d):
        super().__init__()
        self.flipped = nn.Parameter(torch.randn(1, T, d))

    def forward(self, h):
        return h + self.flipped


class NotBroadcasts(nn.Module):
    """Shared tensors that are not broadcast over the samples: a product, samples permuted, an index."""

    def __init__(self, d=5, T=3):
        super().__init__()
        self.scale = nn.Embedding(T, d)  # multiplied: not a broadcast add
        self.shift = Shift(T, d)  # added to the samples in reversed order: the probe refuses axis 0
        self.table = nn.Parameter(torch.randn(4, d))  # indexed, in the model's own forward
        self.inp = nn.Linear(d, d)

    def forward(self, x):  # (M, T, d)
        T = x.shape[1]
        h = self.inp(x) * self.scale(torch.arange(T))
        h = self.shift(h.flip(0)).flip(0)
        h = h + self.table[torch.tensor([0, 2, 1])]
        return torch.tanh(h).mean(1)[:, :3]


def test_other_shared_uses_keep_the_exact_general_routes():
    torch.manual_seed(5)
    model = NotBroadcasts().to(DT)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(5, 3, 5, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    losses_of = lambda m: CE(m(x), y)  # noqa: E731
    rec, tr, caught = track_one(model, losses_of)
    assert tr.engine.routes == {"inp": "linear", "scale": "batched backward", "shift.flipped": "batched backward",
                                "table": "fallback"}
    assert any(issubclass(w.category, SharedTensorWarning) for w in caught)
    assert_exact(rec, model, losses_of, tr.layers)


# -- outside models as shipped --------------------------------------------------------------------------
def test_hf_gpt2_as_shipped_positions_take_the_batched_route():
    transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")
    torch.manual_seed(0)
    V, M, T = 40, 4, 6
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).to(DT)
    ids = torch.randint(0, V, (M, T), generator=torch.Generator().manual_seed(1))

    def losses_of(m):  # next-token cross-entropy, the mean over each sequence's positions
        logits = m(input_ids=ids).logits[:, :-1]
        return CE(logits.reshape(-1, V), ids[:, 1:].reshape(-1)).reshape(M, -1).mean(1)

    rec, tr, caught = track_one(model, losses_of)
    assert tr.engine.routes["transformer.wpe"] == "broadcast"
    assert "batched backward" not in tr.engine.routes.values()
    no_flood(caught)
    assert_exact(rec, model, losses_of, tr.layers)


def test_hf_bert_as_shipped_positions_take_the_batched_route():
    transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")
    torch.manual_seed(0)
    V, M, T = 40, 4, 6
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=8, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = transformers.BertForMaskedLM(cfg).to(DT)
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, V, (M, T), generator=g), torch.randint(0, V, (M, T), generator=g)
    losses_of = lambda m: CE(m(input_ids=ids).logits.reshape(-1, V), labels.reshape(-1)).reshape(M, T).mean(1)  # noqa: E731
    rec, tr, caught = track_one(model, losses_of)
    assert tr.engine.routes["bert.embeddings.position_embeddings"] == "broadcast"
    assert "batched backward" not in tr.engine.routes.values()
    no_flood(caught)
    assert_exact(rec, model, losses_of, tr.layers)


def test_timm_vit_tiny_as_shipped_class_token_and_pos_embed_without_the_fallback_over_the_model():
    timm = pytest.importorskip("timm", reason="timm is an optional test dependency")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=12,
                              depth=1, num_heads=2, num_classes=3).to(DT)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 16, 16, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g)
    losses_of = lambda m: CE(m(x), y)  # noqa: E731
    rec, tr, caught = track_one(model, losses_of)
    assert tr.engine.routes["cls_token"] == tr.engine.routes["pos_embed"] == "parameter"
    assert "fallback" not in tr.engine.routes.values() and "batched backward" not in tr.engine.routes.values()
    no_flood(caught)  # no functorch "batching rule" warnings: nothing is vmapped over the model
    assert_exact(rec, model, losses_of, tr.layers)
    # before: the per-module fallback over the whole model, with the warnings (so the check above can fail)
    before, tr0, caught0 = track_one(model, losses_of, broadcast_uses=False)
    assert tr0.engine.routes["cls_token"] == tr0.engine.routes["pos_embed"] == "fallback"
    assert any("batching rule" in str(w.message) for w in caught0)
    assert math.isclose(before.layers["pos_embed"]["diffusion_sq"], rec.layers["pos_embed"]["diffusion_sq"],
                        rel_tol=1e-9)


def test_an_adaptive_optimizer_scales_the_broadcast_per_sample_gradients_as_the_coupled_engine():
    """Adam's elementwise noise scale S ∘ g_i on the broadcast routes, against the coupled engine (exact)."""
    torch.manual_seed(7)
    model = Broadcasts().to(DT)
    g = torch.Generator().manual_seed(8)
    ids, y = torch.randint(0, 9, (5, 4), generator=g), torch.randint(0, 3, (5,), generator=g)
    rows = {}
    for engine in ("factored", "coupled"):
        m = copy.deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        tr = Tracker(m, opt, engine=engine)
        for _ in range(2):  # the second step has Adam's state
            opt.zero_grad()
            rec = tr.backward(CE(m(ids), y))
            opt.step()
        rows[engine] = rec.as_row()
        if engine == "factored":
            assert tr.engine.routes["pos"] == "broadcast" and tr.engine.routes["cls_token"] == "parameter"
        tr.close()
    a, b = rows["factored"], rows["coupled"]
    names = [k for k in a if k.startswith(("drift/", "noise_curvature/", "diffusion_sq/"))]
    assert any(k.endswith("/cls_token") for k in names)
    for k in names:
        assert math.isclose(a[k], b[k], rel_tol=1e-8, abs_tol=1e-14), (k, a[k], b[k])
