"""Hugging Face models and dict batches: per-sample losses, the tracker, the SDE, and SdelipTrainer (tiny random-init)."""

import math
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'sdelip[integrations]')")

from sdelip.integrations.batches import hf_model_and_data, per_sample_loss  # noqa: E402
from sdelip.tracking.tracker import Tracker  # noqa: E402

V, T, M = 40, 8, 4


def gpt2(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def bert(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).to(dtype)


def lm_data(n=8):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, V, (n, T), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]


def cls_data(n=8):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (n, T), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "token_type_ids": torch.zeros_like(i),
             "labels": l} for i, l in zip(ids, y)]


def _batch(data):
    return torch.utils.data.default_collate(data[:M])


@pytest.mark.parametrize("make, data", [(gpt2, lm_data), (bert, cls_data)])
def test_per_sample_loss_mean_is_the_models_loss(make, data):
    model, batch = make(), _batch(data())
    out = model(**batch)
    losses = per_sample_loss(out, batch, model)
    assert losses.shape == (M,)
    torch.testing.assert_close(losses.mean(), out.loss.to(losses.dtype), rtol=1e-6, atol=1e-7)


def test_per_sample_loss_with_padding_is_the_token_mean():
    model, batch = gpt2(), _batch(lm_data())
    batch["labels"][0, 5:] = -100
    batch["labels"][2, 3:] = -100
    out = model(**batch)
    losses = per_sample_loss(out, batch, model)
    torch.testing.assert_close(losses.mean(), out.loss.to(losses.dtype), rtol=1e-6, atol=1e-7)
    own = per_sample_loss(out, batch, model, weighting="sample")
    assert not torch.allclose(own.mean(), losses.mean())


@pytest.mark.parametrize("make, data", [(gpt2, lm_data), (bert, cls_data)])
def test_tracker_factored_on_the_hf_model_equals_materialised(make, data):
    """The factored engine on the HF model (dict batches, ModelOutput) against the vmap oracle on the adapter."""
    batches = [_batch(data()[k * M:(k + 1) * M]) for k in range(2)]
    rows = {}
    for engine in ("factored", "materialised"):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = torch.utils.data.DataLoader(data(), batch_size=M)
        adapter, packed, _ = hf_model_and_data(model, loader)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if engine == "factored":
                tracker = Tracker(model, opt, example_input=batches[0])
            else:
                causal = type(model).__name__.endswith("LMHeadModel")
                tracker = Tracker(adapter, opt, engine="materialised",
                                  loss_fn=lambda o, t: per_sample_loss(o, t, causal=causal, weighting="sample"))
            for (x, y), batch in zip(packed, batches):
                opt.zero_grad()
                if engine == "factored":
                    tracker.backward(per_sample_loss(model(**batch), batch, model))
                else:
                    tracker.backward(per_sample_loss(adapter(x), y, causal=causal), batch=(x, y))
                opt.step()
            tracker.close()
        df = tracker.to_dataframe()
        rows[engine] = df.rename(columns=lambda c: c.replace("/model.", "/"))
    a, b = rows["factored"], rows["materialised"]
    assert len(a) == 2 and any(c.startswith("drift/") for c in a.columns)
    for c in a.columns:
        if a[c].dtype.kind == "f" and not c.startswith("realised"):
            np.testing.assert_allclose(a[c], b[c], rtol=1e-8, atol=1e-12, err_msg=c)


def test_lipschitz_sde_takes_an_hf_model_and_dict_loader():
    from sdelip.sde import LipschitzSDE, simulate

    model = gpt2()
    loader = torch.utils.data.DataLoader(lm_data(), batch_size=M)
    sde = LipschitzSDE(model, loader, lr=0.1)
    assert sde.M == M and all(l.name.startswith("model.transformer.") for l in sde.layers)
    res = simulate(sde, n=2, ts=[0.0, 0.2], progress=False)
    assert np.isfinite(res.mean_K).all() and res.mean_K[0] > 0 and res.var_K[-1] > 0


def _trainer(tmp_path, max_grad_norm=1.0, record="hf.db", **kw):
    pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs accelerate (pip install 'sdelip[integrations]')")
    from sdelip.integrations.huggingface import SdelipTrainer

    kw = {"max_steps": 4, "save_strategy": "no", **kw}
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True,
                                          per_device_train_batch_size=M, report_to=[], max_grad_norm=max_grad_norm,
                                          logging_steps=1, disable_tqdm=True, **kw)
    return SdelipTrainer(model=gpt2(torch.float64), args=args, train_dataset=lm_data(16),
                         sdelip_record=tmp_path / record)


def test_hf_trainer_checkpoint_resume(tmp_path):
    """A run resumed from a Trainer checkpoint writes the record of the uninterrupted run."""
    from sdelip.record import load_record
    from sdelip.tracking.options import RecordOptions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, 1e9, record="full.db", max_steps=6, save_strategy="steps", save_steps=3).train()
        trainer = _trainer(tmp_path, 1e9, record="full.db", max_steps=6)
        trainer.sdelip_record = RecordOptions(tmp_path / "resumed.db")
        import shutil

        shutil.copy(tmp_path / "full.db", tmp_path / "resumed.db")  # rows 3–5 are replaced by the resumed run
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    full, resumed = load_record(tmp_path / "full.db"), load_record(tmp_path / "resumed.db")
    assert len(resumed) == 6 and trainer.tracker.metadata["resumed_at"] == [3]
    for c in full.columns:
        if full[c].dtype.kind == "f":
            np.testing.assert_allclose(resumed[c], full[c], rtol=1e-10, atol=1e-14, err_msg=c)


@pytest.mark.parametrize("max_grad_norm", [1.0, 1e9])
def test_hf_trainer_with_its_defaults(tmp_path, max_grad_norm):
    """AdamW (the Trainer's fused default), the linear schedule, clipping: modelled rows are exact, clipped ones flagged."""
    from sdelip.record import load_record

    trainer = _trainer(tmp_path, max_grad_norm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    df = load_record(tmp_path / "hf.db")
    meta = trainer.tracker.metadata["optimizer"]
    assert len(df) == 4 and meta["class"] == "AdamW" and meta["param_groups"][0]["fused"] is True  # the default
    lrs = df["lr"].to_numpy()
    assert (np.diff(lrs) < 0).all()  # the linear schedule, read at every step
    assert math.isclose(df["t"].iloc[-1], lrs[:-1].sum(), rel_tol=1e-12)
    layers = [c.split("/", 1)[1] for c in df.columns if c.startswith("drift/")]
    for _, row in df.iterrows():
        if row["update_modelled"]:
            for name in layers:
                assert math.isclose(row[f"realised_drift/{name}"], row[f"drift/{name}"], rel_tol=1e-6, abs_tol=1e-9)
        else:
            assert "clip" in str(row["update_note"]).lower() or "scale" in str(row["update_note"]).lower()
    if max_grad_norm == 1.0:  # the default: this model's gradient norms are 1.3–1.8, every Adam step is clipped
        assert not df["update_modelled"].any()  # flagged, not modelled (sdelip.optim)
    else:  # clipping never applies: every step modelled, realised_drift = drift (checked above)
        assert df["update_modelled"].all()
    logged = [h for h in trainer.state.log_history if "sdelip/K" in h]
    assert len(logged) == 4
    # the record of a Hugging Face run is an ordinary record: the command line reads it
    from sdelip.cli import main

    assert main(["info", str(tmp_path / "hf.db")]) == 0
    # predicting needs modelled steps: the clipped AdamW run is refused by name, the unclipped one predicted
    assert main(["predict", str(tmp_path / "hf.db"), "--csv", str(tmp_path / "p.csv")]) == (0 if max_grad_norm > 1 else 2)


def test_hf_trainer_refusals(tmp_path):
    from sdelip.errors import IntegrationError

    with pytest.raises(IntegrationError, match="gradient_accumulation_steps"):
        _trainer(tmp_path, gradient_accumulation_steps=2)
