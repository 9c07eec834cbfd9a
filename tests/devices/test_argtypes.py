"""The shared argparse converters: bounds, integers, and no nan/inf through a bound check."""

import argparse

import pytest

from devices.argtypes import number, positive_float


@pytest.mark.parametrize(
    "conv,text,message",
    [
        (number(int, minimum=1), "0", "must be >= 1, got 0"),
        (number(int, minimum=1), "1.5", "must be an integer, got '1.5'"),
        (number(float, minimum=0, strict=True), "0", "must be > 0, got 0"),
        (number(float, minimum=0), "x", "must be a number, got 'x'"),
        (number(float, minimum=0), "inf", "must be a finite number, got inf"),
        (number(float), "nan", "must be a finite number, got nan"),
        (positive_float, "-1e-9", "must be > 0, got -1e-9"),
        (positive_float, "Infinity", "must be a finite number, got Infinity"),
    ],
)
def test_bad_values_are_named(conv, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        conv(text)
    assert str(info.value) == message


def test_good_values_come_back_typed():
    assert number(int, minimum=0)("0") == 0 and isinstance(number(int)("7"), int)
    assert number(float, minimum=0)("0") == 0.0
    assert positive_float("2.5") == 2.5 and isinstance(positive_float("3"), float)


def test_argparse_prefixes_the_flag(capsys):
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=positive_float)
    with pytest.raises(SystemExit) as info:
        p.parse_args(["--lr", "inf"])
    assert info.value.code == 2
    assert "argument --lr: must be a finite number, got inf" in capsys.readouterr().err
