"""Models as shipped by others, and the last silent numbers (issue 27).

Every tracked term is checked against a float64 oracle: per-sample gradients by an autograd
loop over the samples on an untouched copy of the model (``autograd.grad(losses[i], θ)``,
the total derivative over every use), reduced by :func:`sdelip.core.formulas.layer_terms`.
Outside libraries (transformers, timm, torchvision) are optional: their tests skip with the
reason when absent.
"""

import copy
import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oracles import per_sample_terms
from sdelip.errors import SharedTensorWarning, UnsupportedLayerError
from sdelip.rules.inventory import tracked_layers, weight_inventory
from sdelip.tracking.options import RuntimeOptions
from sdelip.tracking.tracker import Tracker

DT = torch.float64
LR = 0.05
CE = functools.partial(F.cross_entropy, reduction="none")
TERMS = ("drift", "noise_curvature", "diffusion_sq")


def oracle_rows(model, losses_of, layers, scale=1.0, batch_grad=False):
    """Per-layer Thm 14 terms of :data:`TERMS` from per-sample gradients (:func:`oracles.per_sample_terms`)."""
    return per_sample_terms(model, losses_of, layers, LR, scale=scale, batch_grad=batch_grad, terms=TERMS)


def track_one(model, losses_of, engine="auto", batch=None, loss_fn=None, **kw):
    """One tracked SGD step on a copy of ``model``: (row, tracker)."""
    m = copy.deepcopy(model)
    tr = Tracker(m, torch.optim.SGD(m.parameters(), lr=LR), engine=engine, loss_fn=loss_fn, **kw)
    rec = tr.backward(losses_of(m), batch=batch)
    tr.close()
    return rec, tr


def assert_rows(rec, want, rtol=1e-8):
    for name, terms in want.items():
        for q, v in terms.items():
            got = rec.layers[name][q]
            assert math.isclose(got, v, rel_tol=rtol, abs_tol=1e-14), f"{q}/{name}: {got!r} vs oracle {v!r}"


def data(shape, M=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, *shape, generator=g, dtype=DT), torch.randint(0, classes, (M,), generator=g)


# -- 2. uses counted, not modules ------------------------------------------------------------------
class SharedTable(nn.Module):
    """T5's pattern: ``shared`` holds the table, never called; its tied copies apply it twice."""

    def __init__(self, V=7, d=5):
        super().__init__()
        self.shared = nn.Embedding(V, d)
        self.embed = nn.Embedding(V, d)
        self.embed.weight = self.shared.weight
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.shared.weight

    def forward(self, ids, scale=1.0):
        return self.head(torch.tanh(self.mix(self.embed(ids)) * scale)).mean(1)


@pytest.mark.parametrize("how", ["dict", "tuple"])
def test_an_uncalled_owner_counts_zero_uses_and_example_input_takes_arguments(how):
    torch.manual_seed(3)
    model = SharedTable().to(DT)
    ids = torch.randint(0, 7, (6, 4))
    y = torch.randint(0, 7, (6,))
    ex = {"ids": ids, "scale": 0.5} if how == "dict" else (ids, 0.5)
    layers = tracked_layers(model, example_input=ex)
    tied = next(l for l in layers if "shared" in l.module_names)
    assert tied.uses == 2 and dict(zip(tied.module_names, tied.calls)) == {"embed": 1, "head": 1, "shared": 0}
    assert tied.name == "embed"  # named by its first use, not by the module that never applies it
    assert [l.uses for l in tracked_layers(model)] == [3, 1]  # without example_input: every module once
    losses_of = lambda m: CE(m(ids, 0.5), y)  # noqa: E731
    rec, tr = track_one(model, losses_of, example_input=ex)
    assert_rows(rec, oracle_rows(model, losses_of, tr.layers))
    z = sum(l.uses * math.log(float(torch.linalg.matrix_norm(l.matrix().detach(), 2))) for l in tr.layers)
    assert math.isclose(rec.network["Z"], z, rel_tol=1e-10)


def test_a_weight_no_module_applies_is_left_out_with_the_reason():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.spare = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x)

    x, _ = data((4,))
    layers, left = weight_inventory(Unused().to(DT), example_input=x)
    assert [l.name for l in layers] == ["a"]
    assert any(o.name == "spare.weight" and "not applied" in o.reason for o in left)


def test_t5_shared_embedding_is_applied_three_times():
    transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1,
                                num_heads=2, tie_word_embeddings=True, dropout_rate=0.0)
    model = transformers.T5ForConditionalGeneration(cfg).to(DT)
    ids, dec = torch.randint(0, 40, (4, 5)), torch.randint(0, 40, (4, 3))
    layers = tracked_layers(model, example_input={"input_ids": ids, "decoder_input_ids": dec})
    tied = [l for l in layers if "shared" in l.module_names]
    assert len(tied) == 1 and tied[0].uses == 3, [(l.name, l.module_names, l.calls) for l in tied]
    assert dict(zip(tied[0].module_names, tied[0].calls))["shared"] == 0


# -- 3. zero gradients are exact ---------------------------------------------------------------------
class ZeroBranch(nn.Module):
    """A residual branch whose last BatchNorm scale is zero (zero_init_residual) and a dead-ReLU Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        nn.init.zeros_(self.bn.weight)
        self.dead = nn.Linear(4, 4)
        self.after = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.dead.bias.fill_(-100.0)  # ReLU(dead(·)) = 0 for every sample: `after` has g_i = 0

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.bn(self.conv(h))
        f = h.mean((2, 3))
        return self.head(f + self.after(torch.relu(self.dead(f))))


def test_zero_per_sample_gradients_are_exact_without_warning_and_resolved_later():
    torch.manual_seed(4)
    model = ZeroBranch().to(DT).eval()
    x, y = data((2, 5, 5), M=5)
    losses_of = lambda m: CE(m(x), y)  # noqa: E731
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    tr = Tracker(m, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SharedTensorWarning)
        rec = tr.backward(losses_of(m))
    want = oracle_rows(model, losses_of, tr.layers)
    assert want["conv"]["diffusion_sq"] == 0.0 and want["after"]["diffusion_sq"] == 0.0  # the test's premise
    assert_rows(rec, want)
    assert rec.layers["conv"]["drift"] == 0.0 and rec.layers["conv"]["noise_curvature"] == 0.0
    assert not any(k[0] == "conv" for k in tr.engine._axis_cache)  # not resolved while g_i = 0
    opt.step()
    opt.zero_grad()
    snapshot = copy.deepcopy(m)
    rec = tr.backward(losses_of(m))  # bn.weight ≠ 0 now: conv's batch axis is resolved and its terms exact
    want = oracle_rows(snapshot, losses_of, tr.layers)
    assert want["conv"]["diffusion_sq"] > 0
    assert_rows(rec, want)
    assert any(k[0] == "conv" for k in tr.engine._axis_cache)
    tr.close()


@pytest.mark.slow  # about 10 s on the shared 2-core machine
def test_torchvision_resnet18_zero_init_residual():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is an optional test dependency")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(zero_init_residual=True, num_classes=3).to(DT).eval()
    x, y = data((3, 32, 32), M=3)
    losses_of = lambda m: CE(m(x), y)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", SharedTensorWarning)
        rec, tr = track_one(model, losses_of)
    assert tr.engine.name == "factored"
    some = [l for l in tr.layers if l.name in ("conv1", "layer1.0.conv2", "layer4.1.conv2", "fc")]
    want = oracle_rows(model, losses_of, some)
    assert want["layer1.0.conv2"]["diffusion_sq"] == 0.0
    assert_rows(rec, want)


# -- 4. shape, not name --------------------------------------------------------------------------------
class BiasTable(nn.Module):
    """A relative-position bias table (2-D, "bias" in its name) added to attention scores."""

    def __init__(self, T=4, heads=2, d=6):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.relative_position_bias_table = nn.Parameter(0.3 * torch.randn(2 * T - 1, heads))
        self.register_buffer("index", (torch.arange(T)[:, None] - torch.arange(T)[None, :] + T - 1))
        self.heads, self.head = heads, nn.Linear(d, 3)

    def forward(self, x):
        M, T, d = x.shape
        q, k, v = self.qkv(x).reshape(M, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.index].permute(2, 0, 1)  # (heads, T, T)
        a = torch.softmax(q @ k.transpose(-1, -2) + bias, -1)
        return self.head((a @ v).transpose(1, 2).reshape(M, T, d).mean(1))


def test_a_two_dimensional_bias_table_is_a_tracked_weight():
    torch.manual_seed(5)
    model = BiasTable().to(DT)
    layers, left = weight_inventory(model)
    assert "relative_position_bias_table" in [l.name for l in layers]
    assert [o.name for o in left] == ["qkv.bias", "head.bias"]
    x, y = data((4, 6), M=5)
    losses_of = lambda m: CE(m(x), y)  # noqa: E731
    for engine in ("factored", "coupled"):
        rec, tr = track_one(model, losses_of, engine=engine)
        assert_rows(rec, oracle_rows(model, losses_of, tr.layers))
    with pytest.raises(UnsupportedLayerError, match="relative_position_bias_table"):
        Tracker(copy.deepcopy(model), lr=LR, runtime=RuntimeOptions(unsupported="error"))


def test_timm_levit_and_swin_tables_are_not_left_out_as_biases():
    timm = pytest.importorskip("timm", reason="timm is an optional test dependency")
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, window_size=7,
                             embed_dim=12, depths=(1, 1), num_heads=(1, 2), num_classes=3)
    layers, left = weight_inventory(swin)
    names = [l.name for l in layers]
    assert any(n.endswith("relative_position_bias_table") for n in names)
    assert not any("relative_position_bias_table" in o.name for o in left)
    # exact: the window attention flattens the samples with the windows (no batch axis), so the
    # fallback takes the table's per-sample gradient over the whole call against each sample's δ
    torch.manual_seed(0)
    small = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=28, patch_size=2,
                              window_size=7, embed_dim=8, depths=(1,), num_heads=(2,), num_classes=3).to(DT)
    x, y = data((3, 28, 28), M=3)
    losses_of = lambda m: CE(m(x), y)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SharedTensorWarning)  # true: samples flattened with the windows
        rec, tr = track_one(small, losses_of)
    some = [l for l in tr.layers if "relative_position" in l.name or l.name.endswith("qkv")]
    assert len(some) == 2
    assert_rows(rec, oracle_rows(small, losses_of, some))
    levit = timm.create_model("levit_128s", pretrained=False, num_classes=3)
    layers, left = weight_inventory(levit)
    assert any(l.name.endswith("attention_biases") for l in layers)
    assert not any(o.name.endswith("attention_biases") for o in left)


# -- 7. recurrent layers -----------------------------------------------------------------------------------
class Recurrent(nn.Module):
    def __init__(self, cls, batch_first, packed=False, **kw):
        super().__init__()
        self.rnn = cls(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first, **kw)
        self.batch_first, self.packed = batch_first, packed
        self.head = nn.Linear(2 * kw.get("proj_size", 4) if kw.get("proj_size") else 8, 3)

    def forward(self, x, lengths=None):
        xin = x if self.batch_first else x.transpose(0, 1)
        if self.packed:
            xin = nn.utils.rnn.pack_padded_sequence(xin, lengths, batch_first=self.batch_first, enforce_sorted=False)
        out, h = self.rnn(xin)
        if self.packed:
            out = nn.utils.rnn.pad_packed_sequence(out, batch_first=self.batch_first)[0]
        out = out if self.batch_first else out.transpose(0, 1)
        hn = h[0] if isinstance(h, tuple) else h
        return self.head(out.mean(1)) + hn.sum(0).sum(-1, keepdim=True)  # the final states carry samples on axis 1


@pytest.mark.parametrize("cls,kw", [(nn.RNN, {}), (nn.LSTM, {}), (nn.LSTM, {"proj_size": 2}), (nn.GRU, {})],
                         ids=["rnn", "lstm", "lstm_proj", "gru"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_layers_are_exact(cls, kw, batch_first):
    torch.manual_seed(6)
    model = Recurrent(cls, batch_first, **kw).to(DT)
    x, y = data((5, 3), M=5)  # T = M: the layout, not the sizes, says where the samples are
    losses_of = lambda m: CE(m(x), y)  # noqa: E731
    rec, tr = track_one(model, losses_of)
    assert tr.engine.name == "factored" and len(tr.layers) == 1 + 2 * 2 * (3 if kw else 2)
    assert_rows(rec, oracle_rows(model, losses_of, tr.layers))


def test_packed_sequences_are_refused_by_name_and_exact_with_coupled():
    torch.manual_seed(7)
    model = Recurrent(nn.LSTM, True, packed=True).to(DT)
    x, y = data((5, 3), M=4)
    lengths = torch.tensor([5, 2, 4, 3])
    losses_of = lambda m: CE(m(x, lengths), y)  # noqa: E731
    m = copy.deepcopy(model)
    tr = Tracker(m, lr=LR)
    from sdelip.errors import RecurrentInputError
    with pytest.raises(RecurrentInputError, match=r"LSTM 'rnn' is given a PackedSequence.*engine='coupled'"):
        losses_of(m)
    tr.close()
    rec, tr = track_one(model, losses_of, engine="coupled")
    assert_rows(rec, oracle_rows(model, losses_of, tr.layers))


# -- 5. gradient penalties ---------------------------------------------------------------------------------
def penalised(lam=0.5):
    """ℓ_i + λ‖∂ℓ_i/∂x_i‖²: the penalty's gradient is taken with create_graph=True."""
    def losses_of(m, x, y):
        x = x.clone().requires_grad_(True)
        loss = CE(m(x), y)
        gx, = torch.autograd.grad(loss.sum(), x, create_graph=True)
        return loss + lam * gx.pow(2).sum(1)
    return losses_of


def test_a_gradient_penalty_is_exact_with_coupled_and_refused_with_the_true_cause_otherwise():
    from sdelip.errors import LossMismatchError, SecondOrderLossError
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    x, y = data((5,), M=6)
    losses_of = functools.partial(penalised(), x=x, y=y)
    rec, tr = track_one(model, losses_of, engine="coupled")
    assert_rows(rec, oracle_rows(model, losses_of, tr.layers))
    with pytest.raises(SecondOrderLossError, match=r"step 0: the losses contain a gradient taken with "
                                                   r"create_graph=True.*engine='coupled'"):
        track_one(model, losses_of, engine="factored")
    # materialised recomputes loss_fn (without the penalty): refused by name, not a number of another loss
    with pytest.raises(LossMismatchError, match=r"layer '0' at step 0: the per-sample gradients of loss_fn"):
        track_one(model, losses_of, engine="materialised", batch=(x, y), loss_fn=CE)
    # the same check passes when loss_fn is the loss of the step
    rec, tr = track_one(model, lambda m: CE(m(x), y), engine="materialised", batch=(x, y), loss_fn=CE)
    assert_rows(rec, oracle_rows(model, lambda m: CE(m(x), y), tr.layers))


def test_materialised_refuses_a_loss_fn_other_than_the_steps_loss():
    from sdelip.errors import LossMismatchError
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    x, y = data((5,), M=6)
    with pytest.raises(LossMismatchError, match="not the loss whose gradient the step applied"):
        track_one(model, lambda m: CE(m(x), y) + 1e-3 * m[0].weight.pow(2).sum(), engine="materialised",
                  batch=(x, y), loss_fn=CE)


# -- 6. mixed precision --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_coupled_records_the_applied_gradients_others_refuse(dtype):
    from sdelip.errors import MixedPrecisionError
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    s = 1024.0 if dtype == torch.float16 else 1.0

    def losses_of(m):
        with torch.autocast("cpu", dtype=dtype):
            return CE(m(x), y) * s

    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    tr = Tracker(m, opt, engine="coupled")
    if dtype == torch.float16:  # fp16 with a GradScaler: the tracker sees the scaled losses, the step unscales
        scaler = torch.amp.GradScaler("cpu", init_scale=s)
        with torch.autocast("cpu", dtype=dtype):
            losses = scaler.scale(CE(m(x), y))
        tr.backward(losses)
        scaler.step(opt)
        scaler.update()
    else:
        tr.backward(losses_of(m))
        opt.step()
    rec = tr.last
    tr.close()
    assert tr.metadata["precision"] == f"autocast {str(dtype)[6:]} (parameters float32)"
    # against the autocast graph's own per-sample gradients (float32 reductions: rtol 1e-5)
    # (with the GradScaler the step is an edited one: μ from the unscaled gradient the optimizer applied)
    assert_rows(rec, oracle_rows(model, losses_of, tr.layers, scale=s, batch_grad=s != 1.0), rtol=1e-5)
    # and not the gradients of the float32 forward: the test can tell them apart
    plain = oracle_rows(model, lambda m: CE(m(x), y), tr.layers)
    assert abs(rec.layers["4"]["drift"] / plain["4"]["drift"] - 1) > 1e-5
    for engine in ("factored", "materialised"):
        m = copy.deepcopy(model)
        t2 = Tracker(m, lr=LR, engine=engine, loss_fn=CE)
        with pytest.raises(MixedPrecisionError, match=rf"step 0: the forward pass ran under torch.autocast\('cpu', "
                                                      rf"dtype={dtype}\), and the {engine} engine"):
            t2.backward(losses_of(m) / s, batch=(x, y))
        t2.close()
    m = copy.deepcopy(model)  # a float32 run notes its precision too
    t3 = Tracker(m, lr=LR)
    t3.backward(CE(m(x), y))
    assert t3.metadata["precision"] == "float32"
