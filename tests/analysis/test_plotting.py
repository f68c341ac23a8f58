"""Figures (issue 29): labels on every axis, one time label, a legend per panel, the Thm 17 mean visible
next to the Monte Carlo mean, layer names with their type and shape, a title that says what the run was."""

from __future__ import annotations

import pytest

from sdelip.analysis.plotting import TIME_LABEL, layer_label, run_title, summary_figure
from sdelip.analysis.prediction import predict
from sdelip.record import load_metadata, load_record

from scheduled_runs import steplr_record

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = steplr_record(tmp_path_factory.mktemp("plot") / "steplr.db", steps=12, step_size=5)
    return load_record(path), load_metadata(path)


def test_layer_labels_and_title(run):
    record, meta = run
    assert layer_label(record, "0", meta) == "0 (Linear 6→16)"  # nn.Sequential's module path with its type
    assert layer_label(record, "2") == "2"                       # without metadata: the name alone
    title = run_title(meta, record)
    assert title.startswith("Sequential (2 tracked layers), SGD lr 0.2→0.002 (schedule), batch 16, steps 0–11")


def test_summary_figure_axes(run):
    record, meta = run
    sim = {"t": record["t"].to_numpy(), "mean": record["K"].to_numpy(), "label": "SDE Monte Carlo",
           "quantiles": {0.025: 0.9 * record["K"].to_numpy(), 0.975: 1.1 * record["K"].to_numpy()}}
    fig = summary_figure(record, predict(record), simulation=sim, metadata=meta)
    assert fig._suptitle.get_text() == run_title(meta, record)
    for ax in fig.axes:
        assert ax.get_xlabel() == TIME_LABEL and ax.get_ylabel(), ax.get_title()
        assert ax.get_legend() is not None, ax.get_title()
    top = fig.axes[0]
    lines = {l.get_label(): l for l in top.get_lines()}
    thm17, mc = lines["Thm 17: E[K(t)]"], lines["SDE Monte Carlo mean"]
    # the Monte Carlo mean is dashed and drawn over a wider Thm 17 line: both stay visible where they agree
    assert mc.get_linestyle() != "-" and thm17.get_linewidth() > mc.get_linewidth() and mc.get_zorder() > thm17.get_zorder()
    labels = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert "0 (Linear 6→16)" in labels and "2 (Linear 16→3)" in labels
