"""One flag name per meaning across the verbs, and a verb's own usage on a wrong flag (issue 29)."""

import pytest

from sdelip.cli import build_parser, main


def _flags(verb):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[verb]
    return {s: a.dest for a in sub._actions for s in a.option_strings}


def test_trajectories_flag_is_the_same_in_every_verb():
    for verb in ("demo", "simulate", "plot"):
        flags = _flags(verb)
        assert flags["-n"] == flags["--trajectories"] == "trajectories", verb
        assert "--n" not in flags


@pytest.mark.parametrize("verb", ["simulate", "plot", "predict", "export"])
def test_a_wrong_flag_prints_the_verbs_usage(verb, capsys):
    argv = [verb, "run.db", "--no-such-flag"] + (["--to", "csv"] if verb == "export" else [])
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert f"usage: sdelip {verb}" in err and "unrecognized arguments: --no-such-flag" in err
