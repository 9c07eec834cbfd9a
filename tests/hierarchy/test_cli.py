import pytest

from hierarchy.cli import main

from .test_emulate import SMOKE


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["emulate", str(SMOKE), "--rounds", "0"], "--rounds: must be >= 1"),
        (["emulate", str(SMOKE), "--rounds", "two"], "--rounds: must be an integer, got 'two'"),
        (["emulate", str(SMOKE), "--server-lr", "inf"], "--server-lr: must be a finite number"),
        (["emulate", str(SMOKE), "--lr", "nan"], "--lr: must be a finite number, got nan"),
        (["emulate", str(SMOKE), "--clip-norm", "inf"], "--clip-norm: must be a finite number"),
        (["emulate", str(SMOKE), "--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["emulate", str(SMOKE), "--lr", "-1"], "--lr: must be > 0"),
        (["emulate", str(SMOKE), "--max-grad-norm", "0"], "--max-grad-norm: must be > 0"),
        (["emulate", str(SMOKE), "--max-grad-norm", "-2"], "--max-grad-norm: must be > 0"),
        (
            ["emulate", str(SMOKE), "--max-grad-norm", "big"],
            "--max-grad-norm: must be a number, got 'big'",
        ),
        (["emulate", str(SMOKE), "--lr-warmup-rounds", "-1"], "--lr-warmup-rounds: must be >= 0"),
        (["emulate", str(SMOKE), "--strategy", "fedprox"], "invalid choice: 'fedprox'"),
        (["emulate"], "the following arguments are required: topology"),
        (["emulate", str(SMOKE), "--downlink", "sparse"], "invalid choice: 'sparse'"),
        (["emulate", str(SMOKE), "--downlink-codec", "f32"], "invalid choice: 'f32'"),
        (["emulate", str(SMOKE), "--downlink-history", "0"], "--downlink-history: must be >= 1"),
        (
            ["emulate", str(SMOKE), "--downlink-topk-ratio", "0"],
            "--downlink-topk-ratio: must be > 0",
        ),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_bad_topology_files_exit_2(tmp_path, capsys):
    assert main(["emulate", str(tmp_path / "missing.graphml")]) == 2
    assert "missing.graphml" in capsys.readouterr().err
    bad = tmp_path / "bad.graphml"
    bad.write_text("this is not graphml")
    assert main(["emulate", str(bad)]) == 2
    assert "bad.graphml" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (
            ["--downlink", "full", "--downlink-codec", "int4"],
            "--downlink-codec applies to --downlink delta only",
        ),
        (
            ["--mode", "async", "--downlink-history", "3"],
            "--downlink-history applies to --downlink delta only",
        ),
        (["--mode", "async", "--downlink", "delta"], "not supported with --mode async"),
        (["--downlink-topk-ratio", "1.5"], "downlink-topk-ratio must be in (0, 1]"),
    ],
)
def test_contradictory_downlink_flags_exit_2(argv, needle, capsys):
    assert main(["emulate", str(SMOKE), *argv]) == 2
    assert needle in capsys.readouterr().err


def test_momentum_must_be_below_one(capsys):
    assert main(["emulate", str(SMOKE), "--server-momentum", "1.0"]) == 2
    assert "--server-momentum must be < 1" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_max_grad_norm_must_be_finite(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["emulate", str(SMOKE), "--max-grad-norm", value])
    assert exc.value.code == 2
    assert f"--max-grad-norm: must be a finite number, got {value}" in capsys.readouterr().err


def test_warmup_longer_than_the_run_exits_2(capsys):
    argv = ["emulate", str(SMOKE), "--rounds", "3", "--lr-warmup-rounds", "4"]
    assert main(argv) == 2
    assert "lr-warmup-rounds (4) must not exceed the rounds (3)" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["emulate", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--rounds",
        "--dataset",
        "--seed",
        "--out",
        "--deadline-s",
        "--strategy",
        "--backend",
        "--trainers",
        "--gateway-hosts",
        "--alpha",
        "--max-steps",
        "--max-grad-norm",
        "--lr-warmup-rounds",
        "--downlink",
        "--downlink-codec",
        "--downlink-topk-ratio",
        "--downlink-history",
    ):
        assert flag in text
