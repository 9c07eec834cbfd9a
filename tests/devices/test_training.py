"""Models, single-device training and the vectorized cohort trainer.

The cohort trainer is only useful if it is *the same* training as
``train_device``, so most of this file checks that, device by device, for
every model and for the awkward cases: devices of very different sizes, short
last batches, ``max_steps`` and empty devices.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.nn import functional as F

from devices.cohort import CohortTrainer
from devices.models import (
    build_model,
    default_model,
    flops_per_sample,
    get_flat_params,
    init_params,
    num_params,
    set_flat_params,
)
from devices.training import (
    LocalTrainingConfig,
    batch_plan,
    num_steps,
    train_device,
)

SHAPES = {"mlp": ((64,), 10), "cnn1d": ((6, 128), 12), "cnn2d": ((1, 28, 28), 10)}


# --- batch_plan ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40])
def test_batch_plan_each_epoch_is_a_permutation_in_batches(n: int) -> None:
    cfg = LocalTrainingConfig(epochs=3, batch_size=16)
    plan = batch_plan(n, cfg, seed=7)
    per_epoch = -(-n // 16)
    assert len(plan) == 3 * per_epoch == num_steps(n, cfg)
    for e in range(3):
        batches = plan[e * per_epoch : (e + 1) * per_epoch]
        assert [len(b) for b in batches[:-1]] == [16] * (per_epoch - 1)
        assert 1 <= len(batches[-1]) <= 16
        assert sorted(np.concatenate(batches).tolist()) == list(range(n))


def test_batch_plan_is_deterministic_and_seeded() -> None:
    cfg = LocalTrainingConfig(epochs=2, batch_size=4)
    a, b, c = batch_plan(40, cfg, 1), batch_plan(40, cfg, 1), batch_plan(40, cfg, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # Epochs draw fresh permutations.
    assert not np.array_equal(np.concatenate(a[:10]), np.concatenate(a[10:]))


def test_batch_plan_max_steps_truncates_and_empty_device_has_no_steps() -> None:
    full = batch_plan(40, LocalTrainingConfig(epochs=2, batch_size=16), 3)
    capped = batch_plan(40, LocalTrainingConfig(epochs=2, batch_size=16, max_steps=4), 3)
    assert len(capped) == 4 == num_steps(40, LocalTrainingConfig(epochs=2, max_steps=4))
    assert all(np.array_equal(x, y) for x, y in zip(capped, full[:4], strict=True))
    assert batch_plan(0, LocalTrainingConfig(), 0) == []
    assert batch_plan(10, LocalTrainingConfig(max_steps=0), 0) == []


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        LocalTrainingConfig(batch_size=0)
    with pytest.raises(ValueError, match="max_steps"):
        LocalTrainingConfig(max_steps=-1)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_grad_norm"):
            LocalTrainingConfig(max_grad_norm=bad)


# --- models -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "cnn2d"])
def test_models_shapes_and_budget(name: str) -> None:
    shape, classes = SHAPES[name]
    model = build_model(name, shape, classes)
    assert model(torch.zeros(3, *shape)).shape == (3, classes)
    assert 1_000 < num_params(model) <= 15_000  # float32 update stays < 60 KB
    assert flops_per_sample(model, shape) > 2 * num_params(model) * 0.5


def test_mlp_on_digits_is_64_64_10_and_flops_match_hand_count() -> None:
    model = build_model("mlp", (64,), 10)
    assert [tuple(p.shape) for p in model.parameters()] == [(64, 64), (64,), (10, 64), (10,)]
    assert flops_per_sample(model, (64,)) == 2 * (64 * 64 + 64 * 10)


def test_cnn2d_flops_hand_count() -> None:
    model = build_model("cnn2d", (1, 28, 28), 10)
    macs = 8 * 13 * 13 * (1 * 9) + 16 * 6 * 6 * (8 * 9) + 576 * 10
    assert flops_per_sample(model, (1, 28, 28)) == 2 * macs


def test_default_model_and_unknown_names() -> None:
    assert [default_model(d) for d in ("har", "fashion", "digits")] == ["cnn1d", "cnn2d", "mlp"]
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", (64,), 10)
    with pytest.raises(ValueError, match="unknown dataset"):
        default_model("cifar")


def test_flat_params_round_trip_and_init_params_is_seeded_privately() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = init_params("cnn1d", (6, 128), 12, seed=5)
    after = torch.rand(1)
    assert torch.equal(before, after)  # caller's RNG stream untouched
    assert np.array_equal(a, init_params("cnn1d", (6, 128), 12, seed=5))
    assert not np.array_equal(a, init_params("cnn1d", (6, 128), 12, seed=6))

    model = build_model("cnn1d", (6, 128), 12)
    set_flat_params(model, a)
    flat = get_flat_params(model)
    assert flat.dtype == np.float32 and np.array_equal(flat, a)
    with pytest.raises(ValueError, match="expected a 1-D vector of"):
        set_flat_params(model, a[:-1])


# --- single-device training ---------------------------------------------------------------


def test_train_device_reduces_loss_on_digits() -> None:
    x, y = load_digits(return_X_y=True)
    x = (x[:400] / 16.0).astype(np.float32)
    y = y[:400].astype(np.int64)
    model = build_model("mlp", (64,), 10)
    g = init_params("mlp", (64,), 10, seed=0)

    def loss_at(flat: np.ndarray) -> float:
        set_flat_params(model, flat)
        with torch.no_grad():
            return float(F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)))

    cfg = LocalTrainingConfig(epochs=3, batch_size=16, lr=0.1)
    res = train_device(model, g, x, y, cfg, seed=1)
    assert res.steps == 3 * 25 and res.num_samples == 400
    assert res.delta.dtype == np.float32 and res.delta.shape == g.shape
    assert loss_at(g + res.delta) < 0.7 * loss_at(g)
    assert np.isfinite(res.loss) and res.loss < loss_at(g)


def test_train_device_rejects_mismatched_data() -> None:
    model = build_model("mlp", (64,), 10)
    g = get_flat_params(model)
    with pytest.raises(ValueError, match="same n"):
        train_device(
            model, g, np.zeros((3, 64), np.float32), np.zeros(2, np.int64), LocalTrainingConfig(), 0
        )


# --- cohort == one by one -----------------------------------------------------------------


def _devices(name: str, sizes: list[int], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    shape, classes = SHAPES[name]
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, classes, n))
        for n in sizes
    ]


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "cnn2d"])
@pytest.mark.parametrize(
    "cfg",
    [
        LocalTrainingConfig(epochs=2, batch_size=16, lr=0.1),
        LocalTrainingConfig(epochs=2, batch_size=8, lr=0.05, max_steps=3),
    ],
    ids=["epochs2", "max_steps3"],
)
def test_cohort_matches_train_device_one_by_one(name: str, cfg: LocalTrainingConfig) -> None:
    shape, classes = SHAPES[name]
    # Unsorted sizes, an empty device, duplicates: buckets must map back to caller order.
    sizes = [17, 1, 40, 0, 5, 17, 3]
    data = _devices(name, sizes, seed=0)
    seeds = [11, 12, 13, 14, 15, 16, 17]
    model = build_model(name, shape, classes)
    g = init_params(name, shape, classes, seed=3)
    before = get_flat_params(model)

    res = CohortTrainer(model, max_cohort=3).train(g, data, cfg, seeds)

    assert np.array_equal(get_flat_params(model), before)  # architecture only, never mutated
    assert res.deltas.shape == (len(sizes), g.size) and res.deltas.dtype == np.float32
    assert res.num_samples.tolist() == sizes
    for i, ((x, y), seed) in enumerate(zip(data, seeds, strict=True)):
        ref = train_device(model, g, x, y, cfg, seed)
        assert res.steps[i] == ref.steps == num_steps(sizes[i], cfg)
        np.testing.assert_allclose(res.deltas[i], ref.delta, atol=1e-5, rtol=0)
        assert res.loss[i] == pytest.approx(ref.loss, abs=1e-5)
    assert not res.deltas[3].any() and res.steps[3] == 0 and res.loss[3] == 0.0


def test_read_only_shared_arrays_train_without_warnings() -> None:
    # devices.datasets hands out read-only views into one shared array.
    ((x, y),) = _devices("mlp", [20], seed=1)
    x.setflags(write=False)
    y.setflags(write=False)
    model = build_model("mlp", (64,), 10)
    g = get_flat_params(model)
    cfg = LocalTrainingConfig(batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = train_device(model, g, x, y, cfg, seed=4)
        res = CohortTrainer(model).train(g, [(x, y)], cfg, [4])
    np.testing.assert_allclose(res.deltas[0], ref.delta, atol=1e-5, rtol=0)


def test_cohort_validates_inputs() -> None:
    model = build_model("mlp", (64,), 10)
    trainer = CohortTrainer(model)
    g = get_flat_params(model)
    data = _devices("mlp", [2, 3], seed=0)
    with pytest.raises(ValueError, match="2 devices but 1 seeds"):
        trainer.train(g, data, LocalTrainingConfig(), [0])
    with pytest.raises(ValueError, match="global_params must have shape"):
        trainer.train(g[:-1], data, LocalTrainingConfig(), [0, 1])
    bad = [*data, (np.zeros((2, 64), np.float32), np.zeros(3, np.int64))]
    with pytest.raises(ValueError, match="device 2"):
        trainer.train(g, bad, LocalTrainingConfig(), [0, 1, 2])
    empty = trainer.train(g, [], LocalTrainingConfig(), [])
    assert empty.deltas.shape == (0, g.size)


def test_cohort_per_device_step_caps_match_train_device_with_max_steps():
    from dataclasses import replace

    rng = np.random.default_rng(5)
    model = build_model("mlp", (64,), 10)
    params = init_params("mlp", (64,), 10, seed=1)
    data = [
        (rng.random((n, 64), dtype=np.float32), rng.integers(0, 10, n)) for n in (40, 33, 7, 50)
    ]
    cfg = LocalTrainingConfig(epochs=2, batch_size=8, lr=0.1)
    caps = [3, None, 1, 0]
    res = CohortTrainer(model).train(params, data, cfg, [1, 2, 3, 4], max_steps=caps)
    for i, ((x, y), cap) in enumerate(zip(data, caps, strict=True)):
        one = train_device(model, params, x, y, replace(cfg, max_steps=cap), seed=i + 1)
        assert res.steps[i] == one.steps
        np.testing.assert_allclose(res.deltas[i], one.delta, atol=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "inverse"])
def test_cohort_matches_train_device_over_rounds_with_a_decaying_lr(schedule: str) -> None:
    """A client lr schedule changes only the scalar each round trains with, so several
    FedAvg rounds with a decaying rate must still agree device by device (and in the
    averaged model) between the vectorized cohort and one-device training."""
    from devices.lr_schedule import scheduled_lr

    name = "cnn1d"
    shape, classes = SHAPES[name]
    sizes = [17, 5, 33, 1, 20]
    data = _devices(name, sizes, seed=1)
    model = build_model(name, shape, classes)
    trainer = CohortTrainer(model, max_cohort=2)
    g_cohort = g_single = init_params(name, shape, classes, seed=4)
    rounds = 4
    weights = np.array(sizes, dtype=np.float64) / sum(sizes)
    lrs = []
    for r in range(1, rounds + 1):
        lr = scheduled_lr(0.2, r, rounds, schedule, 0.1)
        lrs.append(lr)
        cfg = LocalTrainingConfig(epochs=2, batch_size=8, lr=lr)
        seeds = [100 * r + i for i in range(len(sizes))]
        res = trainer.train(g_cohort, data, cfg, seeds)
        refs = [
            train_device(model, g_single, x, y, cfg, s)
            for (x, y), s in zip(data, seeds, strict=True)
        ]
        for i, ref in enumerate(refs):
            np.testing.assert_allclose(res.deltas[i], ref.delta, atol=1e-5, rtol=0)
        g_cohort = (g_cohort + weights @ res.deltas).astype(np.float32)
        g_single = (g_single + weights @ np.stack([ref.delta for ref in refs])).astype(np.float32)
        np.testing.assert_allclose(g_cohort, g_single, atol=1e-5, rtol=0)
    assert lrs[0] == pytest.approx(0.2) and lrs[-1] == pytest.approx(0.02)


# --- per-step gradient clipping (max_grad_norm) ----------------------------------------------


def test_train_device_clips_each_step_to_max_grad_norm() -> None:
    """One full-batch step: the update is ``-lr * g * min(1, c / |g|)``, so a clipped step
    moves exactly ``lr * c`` and an unclipped one is bit-identical to no clipping at all."""
    name = "cnn1d"
    shape, classes = SHAPES[name]
    ((x, y),) = _devices(name, [12], seed=2)
    model = build_model(name, shape, classes)
    g = init_params(name, shape, classes, seed=5)
    one_step = LocalTrainingConfig(epochs=1, batch_size=12, lr=0.1)
    free = train_device(model, g, x, y, one_step, seed=0)
    grad_norm = float(np.linalg.norm(free.delta.astype(np.float64))) / 0.1

    c = grad_norm / 4
    clipped = train_device(model, g, x, y, LocalTrainingConfig(1, 12, 0.1, max_grad_norm=c), seed=0)
    assert np.linalg.norm(clipped.delta.astype(np.float64)) == pytest.approx(0.1 * c, rel=1e-4)
    # Same direction, only shorter.
    np.testing.assert_allclose(clipped.delta, free.delta / 4, atol=1e-6, rtol=0)

    loose = train_device(
        model, g, x, y, LocalTrainingConfig(1, 12, 0.1, max_grad_norm=grad_norm * 2), seed=0
    )
    assert np.array_equal(loose.delta, free.delta)


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
@pytest.mark.parametrize("clip", ["active", "inactive"])
def test_cohort_matches_train_device_with_gradient_clipping(name: str, clip: str) -> None:
    """Clipping is per device row of the vmapped step (its norm over all parameter
    tensors): devices of different sizes, short last batches, buckets that mix devices
    still training with finished ones, and an empty device all agree with train_device."""
    shape, classes = SHAPES[name]
    sizes = [17, 1, 40, 0, 5, 23, 3]
    data = _devices(name, sizes, seed=3)
    seeds = [21, 22, 23, 24, 25, 26, 27]
    model = build_model(name, shape, classes)
    g = init_params(name, shape, classes, seed=6)
    # Random-label data at init: step gradients are O(1) here, so 0.05 clips every step
    # and 1e6 none.
    c = 0.05 if clip == "active" else 1e6
    cfg = LocalTrainingConfig(epochs=2, batch_size=8, lr=0.2, max_grad_norm=c)
    plain = LocalTrainingConfig(epochs=2, batch_size=8, lr=0.2)
    trainer = CohortTrainer(model, max_cohort=3)

    res = trainer.train(g, data, cfg, seeds)
    unclipped = trainer.train(g, data, plain, seeds)

    for i, ((x, y), seed) in enumerate(zip(data, seeds, strict=True)):
        ref = train_device(model, g, x, y, cfg, seed)
        assert res.steps[i] == ref.steps
        np.testing.assert_allclose(res.deltas[i], ref.delta, atol=1e-5, rtol=0)
        assert res.loss[i] == pytest.approx(ref.loss, abs=1e-5)
        if clip == "active" and ref.steps:
            # Every step moved exactly lr * c, so the whole update is at most steps * lr * c.
            assert np.linalg.norm(res.deltas[i]) <= ref.steps * 0.2 * c * (1 + 1e-4)
            assert not np.allclose(res.deltas[i], unclipped.deltas[i], atol=1e-4)
    if clip == "inactive":
        np.testing.assert_allclose(res.deltas, unclipped.deltas, atol=1e-6, rtol=0)
    assert not res.deltas[3].any() and res.steps[3] == 0


def test_cohort_clipping_is_per_device_not_per_cohort() -> None:
    """A device with a tiny gradient is left alone while another in the same vmapped call is
    clipped: with c between their norms, each row gets its own scale."""
    name = "mlp"
    shape, classes = SHAPES[name]
    model = build_model(name, shape, classes)
    g = init_params(name, shape, classes, seed=7)
    rng = np.random.default_rng(8)
    big = (rng.normal(size=(8, 64)).astype(np.float32) * 10, rng.integers(0, classes, 8))
    small = (rng.normal(size=(8, 64)).astype(np.float32) * 1e-3, rng.integers(0, classes, 8))
    one = LocalTrainingConfig(epochs=1, batch_size=8, lr=0.1)
    norms = [
        float(np.linalg.norm(train_device(model, g, x, y, one, 0).delta)) / 0.1
        for x, y in (big, small)
    ]
    c = float(np.sqrt(norms[0] * norms[1]))  # geometric middle
    assert norms[1] < c < norms[0]
    cfg = LocalTrainingConfig(epochs=1, batch_size=8, lr=0.1, max_grad_norm=c)
    res = CohortTrainer(model).train(g, [big, small], cfg, [0, 0])
    assert np.linalg.norm(res.deltas[0]) == pytest.approx(0.1 * c, rel=1e-4)
    assert np.linalg.norm(res.deltas[1]) == pytest.approx(0.1 * norms[1], rel=1e-4)
    for i, (x, y) in enumerate((big, small)):
        np.testing.assert_allclose(
            res.deltas[i], train_device(model, g, x, y, cfg, 0).delta, atol=1e-5, rtol=0
        )


def test_device_client_takes_max_grad_norm(tmp_path, capsys) -> None:
    """``tierfl device --max-grad-norm`` reaches the reference client's LocalTrainingConfig."""
    import argparse

    from devices.client import DeviceOptions, LocalTrainer, add_device_parser

    parser = argparse.ArgumentParser()
    add_device_parser(parser.add_subparsers())
    base = [
        "device",
        "--gateway",
        "coap://127.0.0.1:5683",
        "--id",
        "d0",
        "--key",
        str(tmp_path / "d0.key"),
        "--dataset",
        "digits",
    ]
    args = parser.parse_args([*base, "--max-grad-norm", "0.5"])
    fields = DeviceOptions.__dataclass_fields__
    opts = DeviceOptions(**{k: v for k, v in vars(args).items() if k in fields})
    assert LocalTrainer(opts).config.max_grad_norm == 0.5
    assert parser.parse_args(base).max_grad_norm is None
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*base, "--max-grad-norm", "0"])
    assert exc.value.code == 2
    assert "argument --max-grad-norm: must be > 0, got 0" in capsys.readouterr().err
