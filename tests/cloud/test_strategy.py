import numpy as np
import pytest

from cloud.coordinator import Coordinator
from cloud.model_store import ModelStore, model_hash
from cloud.strategy import FedAvg, FedAvgM, make_strategy
from gateway.partial_aggregate import PartialAggregate


def test_fedavg_with_unit_lr_is_weighted_average_of_client_models():
    rng = np.random.default_rng(0)
    x = rng.normal(size=6).astype(np.float32)
    clients = rng.normal(size=(3, 6)).astype(np.float32)
    w = np.array([1.0, 2.0, 5.0])
    coord = Coordinator(x, FedAvg())
    p = PartialAggregate.empty("g", 1, 6)
    p.add_batch(["a", "b", "c"], clients - x, w)
    coord.apply(1, [p])
    np.testing.assert_allclose(coord.params, np.average(clients, axis=0, weights=w), atol=1e-6)
    assert coord.version.version == 1 and coord.version.parent == model_hash(x)


def test_fedavgm_accumulates_velocity():
    opt = FedAvgM(server_lr=0.5, momentum=0.5)
    x = np.zeros(2, dtype=np.float32)
    d = np.array([1.0, -2.0])
    x1 = opt.step(x, d)  # v = d
    x2 = opt.step(x1, d)  # v = 0.5 d + d
    np.testing.assert_allclose(x1, 0.5 * d)
    np.testing.assert_allclose(x2, 0.5 * d + 0.5 * 1.5 * d)


@pytest.mark.parametrize("kw", [{"server_lr": 0.0}, {"server_lr": -1.0}])
def test_bad_hyperparameters_are_refused(kw):
    with pytest.raises(ValueError, match="server_lr"):
        FedAvg(**kw)
    with pytest.raises(ValueError, match="momentum"):
        FedAvgM(momentum=1.0)
    with pytest.raises(ValueError, match="fedavg, fedavgm"):
        make_strategy("fedprox")


def test_empty_round_keeps_the_model_and_nan_is_refused():
    coord = Coordinator(np.ones(3, dtype=np.float32), FedAvg())
    r = coord.apply(1, [PartialAggregate.empty("g", 1, 3)])
    assert r.devices == 0 and coord.version.version == 0
    bad = PartialAggregate.empty("g", 2, 3)
    bad.add("d", np.array([np.nan, 0, 0]), 1.0)
    with pytest.raises(FloatingPointError, match="round 2"):
        coord.apply(2, [bad])
    assert coord.version.version == 0


def test_model_store_versions_hashes_evicts_and_rolls_back():
    store = ModelStore(keep=2)
    a = store.commit(np.zeros(4), 0)
    b = store.commit(np.ones(4), 1)
    assert a.hash != b.hash and b.parent == a.hash
    # The hash is of the exact float32 bytes: identical params, identical hash.
    assert model_hash(np.ones(4, dtype=np.float64)) == b.hash
    c = store.rollback()
    assert c.hash == a.hash and c.version == 2
    store.commit(np.full(4, 2.0), 3)
    store.commit(np.full(4, 3.0), 4)
    with pytest.raises(LookupError, match="not held"):
        store.params(b.hash)
