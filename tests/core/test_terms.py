"""The term specification (sdelip.core.catalogue) is the one source of the record schema, the rows and the SDE names."""

import sqlite3

import attrs
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdelip.core import catalogue as T
from sdelip.core.formulas import LayerTerms, NetworkTerms
from sdelip.record import LAYER_QUANTITIES, NETWORK_QUANTITIES
from sdelip.sde.lipschitz_sde import INTEGRABLE, TERM_NAMES
from sdelip.tracking.tracker import Tracker


def test_every_term_is_a_field_of_the_dynamics_records():
    layer_fields = {f.name for f in attrs.fields(LayerTerms)}
    net_fields = {f.name for f in attrs.fields(NetworkTerms)}
    for t in T.TERMS:
        assert t.name in layer_fields, t
        assert t.network is None or t.network in net_fields, t
    realised = {t.network for t in T.REALISED_TERMS}  # measured after optimizer.step(), not LayerTerms fields
    assert set(T.network_columns()) == net_fields | realised
    ranks = [t.network_rank for t in T.TERMS if t.network]
    assert len(set(ranks)) == len(ranks)


def test_every_term_and_layer_terms_field_has_a_repeated_use_rule():
    """A weight applied c times: each term of its factor σ1^c comes from a rule, none is dropped."""
    for t in T.TERMS:
        assert callable(t.repeated_use), f"the term {t.name!r} has no repeated_use rule"
    rules = T.repeated_use_rules()
    assert set(rules) == {f.name for f in attrs.fields(LayerTerms)}
    assert all(callable(r) for r in rules.values())


def test_a_term_without_a_repeated_use_rule_is_an_error_not_none(monkeypatch):
    from sdelip.core.formulas import layer_terms, repeated_use_terms

    gen = torch.Generator().manual_seed(0)
    t = layer_terms(torch.randn(3, 4, generator=gen, dtype=torch.float64),
                    torch.randn(5, 3, 4, generator=gen, dtype=torch.float64), 0.1, split=False)
    assert repeated_use_terms(t, 2, 0.1).step_curvature is not None
    lost = tuple(attrs.evolve(x, repeated_use=None) if x.name == "step_curvature" else x for x in T.TERMS)
    monkeypatch.setattr(T, "TERMS", lost)
    with pytest.raises(ValueError, match="step_curvature .*no repeated-use rule"):
        repeated_use_terms(t, 2, 0.1)


def test_record_schema_rows_and_sde_names_derive_from_the_spec(tmp_path):
    assert LAYER_QUANTITIES == tuple(t.column for t in T.TERMS + T.REALISED_TERMS)
    assert NETWORK_QUANTITIES == ("Z", "K", "drift_Z", "noise_curvature_Z", "diffusion_sq_Z", "noise_curvature_var_Z",
                                  "noise_curvature_cov_Z", "step_curvature_Z", "realised_drift_Z",
                                  "realised_curvature_Z")
    assert TERM_NAMES == ("sigma1", "drift", "noise_curvature", "diffusion_sq")
    assert INTEGRABLE == ("drift", "noise_curvature", "diffusion_sq", "step_curvature")
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    path = tmp_path / "r.db"
    with Tracker(model, torch.optim.SGD(model.parameters(), lr=0.1), record=path) as tr:
        x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
        row = tr.backward(F.cross_entropy(model(x), y, reduction="none")).as_row()
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cols = {r[1] for r in con.execute("PRAGMA table_info(layer_steps)")}
        net = {r[1] for r in con.execute("PRAGMA table_info(steps)")}
    finally:
        con.close()
    assert set(LAYER_QUANTITIES) <= cols and set(NETWORK_QUANTITIES) <= net
    for t in T.TERMS:
        assert f"{t.column}/0" in row and f"{t.column}/2" in row
        if t.network:
            assert t.network in row


def test_term_lookup():
    assert T.term("K").name == "sigma1" and T.term("drift").symbol == "μ"
    with pytest.raises(KeyError, match="no term 'mu'"):
        T.term("mu")


def test_coefficient_columns_are_the_dynamics_terms():
    assert T.COEFFICIENT_COLUMNS == {
        "drift", "noise_curvature", "noise_curvature_var", "noise_curvature_cov", "diffusion_sq", "step_curvature",
        "drift_Z", "noise_curvature_Z", "noise_curvature_var_Z", "noise_curvature_cov_Z", "diffusion_sq_Z",
        "step_curvature_Z",
    }


def test_predict_and_the_reduced_sde_read_the_columns_the_spec_names(tmp_path, monkeypatch):
    from sdelip.analysis.prediction import predict
    from sdelip.record import load_record
    from sdelip.sde import ReducedLipschitzSDE

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Tracker(model, opt, record=tmp_path / "r.db") as tr:
        for _ in range(4):
            x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
            opt.zero_grad()
            tr.backward(F.cross_entropy(model(x), y, reduction="none"))
            opt.step()
    df = load_record(tmp_path / "r.db")
    expected = predict(df)
    a0, b0 = ReducedLipschitzSDE.from_record(df, per_layer=True).log_coefficients()
    # the spec renames μ's columns: both readers follow it, and the old names no longer satisfy them
    monkeypatch.setitem(T._BY_NAME, "drift", attrs.evolve(T.term("drift"), column="mu", network="mu_Z"))
    renamed = df.rename(columns=lambda c: "mu_Z" if c == "drift_Z" else "mu/" + c[6:] if c.startswith("drift/") else c)
    assert predict(renamed).equals(expected)
    a1, b1 = ReducedLipschitzSDE.from_record(renamed, per_layer=True).log_coefficients()
    assert (a1 == a0).all() and (b1 == b0).all()
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['mu_Z'\]"):
        predict(df)
