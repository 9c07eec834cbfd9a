"""Cloud side of delta downlinks: compressed broadcast steps, chains, fallbacks, device rebuilds."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.broadcast import BroadcastCompressor
from cloud.coordinator import Coordinator
from cloud.downlink import DownlinkConfig, plan_downlink
from cloud.model_store import ModelStore, model_hash
from cloud.strategy import make_strategy
from devices.delta_chain import DeltaChain, apply_step, download_nbytes
from devices.downlink import DownlinkError
from devices.held_model import HeldModels
from gateway.partial_aggregate import PartialAggregate

N = 3_000


def _bits(x: np.ndarray) -> list[int]:
    return np.ascontiguousarray(x, np.float32).view(np.uint32).tolist()


@pytest.mark.parametrize("codec", ["int8", "topk-int8"])
def test_error_feedback_loses_nothing_over_rounds(codec: str) -> None:
    """x_T - x_0 == sum of the steps the optimizer asked for - residual_T."""
    rng = np.random.default_rng(1)
    comp = BroadcastCompressor(codec, topk_ratio=0.05)
    x0 = rng.standard_normal(N).astype(np.float32)
    x, asked = x0, np.zeros(N)
    for _ in range(40):
        u = 0.01 * rng.standard_normal(N)
        target = (x.astype(np.float64) + u).astype(np.float32)
        asked += target.astype(np.float64) - x.astype(np.float64)
        new, step = comp.step(x, target)
        assert _bits(new) == _bits(apply_step(x, step))  # the version is what devices rebuild
        x = new
    assert comp.residual is not None
    applied = x.astype(np.float64) - x0.astype(np.float64)
    np.testing.assert_allclose(applied, asked - comp.residual, rtol=0, atol=1e-9)
    # the residual is what is still owed, and stays small next to what was sent
    lost = np.linalg.norm(asked - applied) / np.linalg.norm(asked)
    assert lost < (0.01 if codec == "int8" else 0.5), lost


def test_without_feedback_top_k_would_drop_small_coordinates_for_good() -> None:
    """Why the residual exists: a coordinate that never makes the top-k still arrives."""
    comp = BroadcastCompressor("topk-int8", topk_ratio=0.01)
    x = np.zeros(N, np.float32)
    u = np.full(N, 1e-3)
    u[:10] = 1.0  # ten big coordinates win every top-k of 30 ...
    for _ in range(60):
        x, _ = comp.step(x, (x + u).astype(np.float32))
    # ... yet the small ones have moved: their residual grew until it was sent
    assert np.count_nonzero(x[10:]) > 100
    np.testing.assert_allclose(x.astype(np.float64) + comp.residual, 60 * u, rtol=0, atol=1e-4)


def test_store_chain_semantics() -> None:
    store = ModelStore(keep=2, keep_steps=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(N).astype(np.float32)
    store.commit(x, 0)
    hashes, comp = [model_hash(x)], BroadcastCompressor("int8")
    for r in range(1, 6):
        x, step = comp.step(x, x + 0.01)
        store.commit(x, r, step=step)
        hashes.append(model_hash(x))
    assert store.chain(hashes[-1]) == []
    assert len(store.chain(hashes[-2]) or []) == 1
    assert len(store.chain(hashes[-4]) or []) == 3
    assert store.chain(hashes[-5]) is None  # older than keep_steps
    assert store.chain("0" * 64) is None  # unknown
    store.rollback()  # a version not made by a step: chains cannot cross it
    assert store.chain(hashes[-1]) is None and store.chain(hashes[-2]) == []


def _delta_round(coord: Coordinator, rng: np.random.Generator, r: int) -> None:
    p = PartialAggregate.empty("gw", r, N)
    p.add("d", (0.02 * rng.standard_normal(N)).astype(np.float32), 1.0)
    coord.apply(r, [p])


def test_devices_rebuild_the_coordinators_exact_model_including_one_that_skipped() -> None:
    rng = np.random.default_rng(2)
    cfg = DownlinkConfig(mode="delta", codec="int8", history=8)
    coord = Coordinator(
        rng.standard_normal(N).astype(np.float32), make_strategy("fedavgm"), downlink=cfg
    )
    fleet = HeldModels()
    kinds: dict[int, list[tuple[bool, int]]] = {0: [], 1: [], 2: []}
    for r in range(1, 11):
        # device 0 every round; device 1 every third round; device 2 only in rounds 1 and 10
        devices = [d for d, on in ((0, True), (1, r % 3 == 1), (2, r in (1, 10))) if on]
        plan = coord.downloads([fleet.held(d) for d in devices])
        for d in devices:  # one device at a time, as each downloads on its own
            got = fleet.receive([d], plan)
            assert got.params.dtype == np.float32
            assert _bits(got.params) == _bits(coord.params)
            assert model_hash(got.params) == coord.version.hash
            assert fleet.held(d) == coord.version.hash
            kinds[d].append((bool(got.full[0]), int(got.steps[0])))
        _delta_round(coord, rng, r)
    assert kinds[0] == [(True, 0)] + [(False, 1)] * 9
    assert kinds[1] == [(True, 0), (False, 3), (False, 3), (False, 3)]  # rounds 1, 4, 7, 10
    # 9 versions behind: past the history of 8, so the full model again
    assert kinds[2] == [(True, 0), (True, 0)]


def test_full_when_unknown_too_old_or_the_chain_is_bigger() -> None:
    rng = np.random.default_rng(3)
    cfg = DownlinkConfig(mode="delta", codec="int8", history=6)
    coord = Coordinator(
        rng.standard_normal(N).astype(np.float32), make_strategy("fedavg"), downlink=cfg
    )
    h = [coord.version.hash]
    for r in range(1, 8):
        _delta_round(coord, rng, r)
        h.append(coord.version.hash)
    plan = plan_downlink(coord.store, [None, "f" * 64, h[0], h[-2], h[-4], h[-5], h[-7]], cfg)
    assert plan.full is not None
    assert plan.full_for == {None, "f" * 64, h[0], h[-5], h[-7]}
    assert set(plan.chains) == {h[-2], h[-4]}
    # an int8 step is ~1/4 of the model: 3 steps are cheaper, 4 are not (h[-5]); h[-7] is
    # within the history but 6 steps, h[0] beyond it
    four = DeltaChain(h[-5], h[-1], N, tuple(coord.store.chain(h[-5]) or ()))
    assert len(four.steps) == 4
    assert plan.nbytes_for(h[-4]) < plan.nbytes_for(None) <= download_nbytes(four)
    # with only chains needed, the full model is not even shipped
    assert plan_downlink(coord.store, [h[-2]], cfg).full is None


def test_full_mode_sends_the_model_to_everyone_and_publishes_uncompressed() -> None:
    rng = np.random.default_rng(4)
    x0 = rng.standard_normal(N).astype(np.float32)
    full = Coordinator(x0, make_strategy("fedavg"), downlink=DownlinkConfig(mode="full"))
    h0 = full.version.hash
    p = PartialAggregate.empty("gw", 1, N)
    delta = (0.02 * rng.standard_normal(N)).astype(np.float32)
    p.add("d", delta, 1.0)
    full.apply(1, [p])
    assert _bits(full.params) == _bits((x0.astype(np.float64) + delta).astype(np.float32))
    plan = full.downloads([h0, None])
    assert plan.chains == {} and plan.full_for == {h0, None}


def test_a_device_the_plan_does_not_cover_or_a_forged_chain_is_an_error() -> None:
    rng = np.random.default_rng(5)
    cfg = DownlinkConfig(mode="delta", codec="int8")
    coord = Coordinator(
        rng.standard_normal(N).astype(np.float32), make_strategy("fedavg"), downlink=cfg
    )
    fleet = HeldModels()
    fleet.receive([0, 1], coord.downloads([None]))
    _delta_round(coord, rng, 1)
    held = fleet.held(0)
    with pytest.raises(DownlinkError, match="does not cover"):
        fleet.receive([0], coord.downloads([None]))  # planned for a device holding nothing
    plan = coord.downloads([held])
    ((base, wire),) = plan.chains.items()
    forged = bytearray(wire)
    forged[-1] = 0 if forged[-1] else 1  # one quantized level of the step (still valid)
    import dataclasses

    bad = dataclasses.replace(plan, chains={base: bytes(forged)})
    with pytest.raises(DownlinkError, match="hash-mismatch"):
        fleet.receive([1], bad)
    assert fleet.held(1) == held  # nothing changed for the device that refused
    assert _bits(fleet.receive([1], plan).params) == _bits(coord.params)


@pytest.mark.parametrize(
    "cfg,needle",
    [
        (DownlinkConfig(mode="sparse"), "unknown downlink 'sparse'"),
        (DownlinkConfig(codec="f32"), "unknown downlink codec 'f32'"),
        (DownlinkConfig(topk_ratio=0.0), "downlink-topk-ratio must be in (0, 1]"),
        (DownlinkConfig(history=0), "downlink-history must be >= 1"),
        (DownlinkConfig(chunk=0), "chunk must be >= 1"),
    ],
)
def test_bad_config_names_the_field(cfg: DownlinkConfig, needle: str) -> None:
    with pytest.raises(ValueError) as e:
        cfg.validate()
    assert needle in str(e.value)
