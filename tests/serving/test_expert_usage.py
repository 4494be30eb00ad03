"""Expert usage for /metrics: counted per batch, sent to Prometheus by its own thread."""
import time

import numpy as np
from prometheus_client import REGISTRY

from serving.expert_usage import ExpertUsage


def routed(layer: int, expert: int) -> float:
    return REGISTRY.get_sample_value("advmoe_expert_routed_samples_total",
                                     {"layer": str(layer), "expert": str(expert)}) or 0.0


def counters(layers: int, experts: int) -> np.ndarray:
    return np.array([[routed(layer, e) for e in range(experts)] for layer in range(layers)])


def imbalance_of(routing: np.ndarray, experts: int) -> np.ndarray:
    """The gauge's definition, on the routing arrays themselves."""
    return np.array([np.bincount(column, minlength=experts).max() / len(column) * experts for column in routing.T])


def test_every_routed_sample_is_counted_once_and_the_imbalance_covers_the_last_window():
    rng = np.random.default_rng(0)
    usage = ExpertUsage(num_experts=3, window=64, interval=3600)  # only the explicit flushes below
    batches = [rng.integers(0, 3, (n, 4)) for n in (1, 5, 17, 1, 40, 3, 2, 10)]
    batches.append(np.full((64, 4), 2))  # one expert takes a whole window: the 10 before it drop out
    start = counters(4, 3)
    for i, batch in enumerate(batches):
        usage.add(batch)
        if i in (2, 5):
            usage.flush()
    usage.flush()
    usage.flush()  # nothing pending: sends nothing again
    grown = counters(4, 3) - start
    everything = np.concatenate(batches)
    np.testing.assert_array_equal(grown, [np.bincount(c, minlength=3) for c in everything.T])

    # the window keeps the newest batches while dropping the oldest would leave >= 64 samples
    kept, samples = [], 0
    for batch in reversed(batches):
        if samples >= 64:
            break
        kept.insert(0, batch)
        samples += len(batch)
    np.testing.assert_allclose(usage.imbalance(), imbalance_of(np.concatenate(kept), 3))
    for layer, value in enumerate(usage.imbalance()):
        assert REGISTRY.get_sample_value("advmoe_routing_imbalance_ratio", {"layer": str(layer)}) == value


def test_a_route_past_the_cards_experts_is_counted_not_lost():
    usage = ExpertUsage(num_experts=2, window=1024, interval=3600)
    start = counters(1, 4)
    usage.add(np.array([[0], [1]]))
    usage.add(np.array([[3], [3], [1]]))
    usage.flush()
    np.testing.assert_array_equal(counters(1, 4) - start, [[1, 2, 0, 2]])
    np.testing.assert_allclose(usage.imbalance(), [2 / 5 * 4])


def test_a_dense_model_counts_nothing_and_starts_no_thread():
    usage = ExpertUsage(num_experts=0)
    usage.add(np.zeros((8, 0), np.int64))
    usage.flush()
    assert usage.flusher is None and usage.imbalance().size == 0


def test_the_counts_reach_prometheus_within_the_interval_without_a_flush_call():
    usage = ExpertUsage(num_experts=2, interval=0.05)
    before = routed(7, 1)
    usage.add(np.ones((5, 8), np.int64))
    deadline = time.monotonic() + 10
    while routed(7, 1) - before < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert routed(7, 1) - before == 5
