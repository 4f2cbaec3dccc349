"""DynamicBatcher against a numpy fake runner: merging, splitting, routing, dropping, failing.

Each request is rows of (id, value); the fake runner answers 2 * value + 1 per row and records
the ids of every batch it ran, so a test sees what was computed and who got which rows.
Synchronisation uses events (a gate the runner waits on), never sleeps.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaeserve.errors import DeadlineExceeded, NotServing, QueueFull
from vaeserve.server import batch_policy
from vaeserve.server.batch_policy import COMPANY_MEMORY_S, INLINE_RUN_S
from vaeserve.server.batcher import THREAD_PREFIX, DynamicBatcher
from vaeserve.server.settings import BatchingSettings

WAIT_S = 10.0  # upper bound of any wait on the runner; never reached when the test passes
POISON = -1.0


class FakeRunner:
    """y = 2 * value + 1 per row; a row holding POISON makes the whole run fail."""

    def __init__(self, gate: threading.Event | None = None):
        self.gate = gate
        self.started = threading.Event()
        self.batches: list[list[int]] = []  # ids of the rows of each run, including failed ones

    def run(self, inputs):
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT_S), "the test never opened the gate"
        x = inputs["x"]  # (rows, 2): id, value
        self.batches.append([int(i) for i in x[:, 0]])
        if (x[:, 1] == POISON).any():
            raise RuntimeError("poisoned row")
        return {"id": x[:, 0].copy(), "y": 2 * x[:, 1] + 1}

    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rows(first_id: int, count: int, value: float = 1.0) -> dict[str, np.ndarray]:
    ids = np.arange(first_id, first_id + count, dtype=np.float64)
    return {"x": np.stack([ids, ids * 0 + value + ids], axis=1)}


def expected(request: dict[str, np.ndarray]) -> np.ndarray:
    return 2 * request["x"][:, 1] + 1


def batching(max_batch_size=4, max_queue_delay_ms=50.0, max_queue_size=64) -> BatchingSettings:
    return BatchingSettings(max_batch_size, max_queue_delay_ms, max_queue_size)


async def started(runner: FakeRunner) -> None:
    """Wait (off the loop) until the runner has begun a run."""
    ok = await asyncio.get_running_loop().run_in_executor(None, runner.started.wait, WAIT_S)
    assert ok, "the runner never started"


def run_batcher(runner, settings, scenario, **kwargs):
    """Run ``scenario(batcher)`` on a fresh loop with a started batcher, then stop it."""

    async def main():
        batcher = DynamicBatcher(runner, settings, name="test", **kwargs)
        await batcher.start()
        try:
            return await scenario(batcher)
        finally:
            if runner.gate is not None:
                runner.gate.set()
            await batcher.stop()

    return asyncio.run(main())


def test_uneven_requests_are_merged_split_and_routed_in_order():
    runner = FakeRunner()
    requests = [rows(0, 2), rows(10, 3), rows(20, 1), rows(30, 9)]

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.run(r) for r in requests))

    results = run_batcher(runner, batching(max_batch_size=4), scenario)
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["y"], expected(request))
        np.testing.assert_array_equal(result["id"], request["x"][:, 0])
    assert runner.sizes() == [4, 4, 4, 3]
    assert runner.batches[0] == [0, 1, 10, 11]  # A whole, then the head of B
    assert runner.batches[1] == [12, 20, 30, 31]  # B's tail, C, D's head


class RecordingRunner(FakeRunner):
    """Keeps the arrays of each run: those it was given and those it returned."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []

    def run(self, inputs):
        outputs = super().run(inputs)
        self.seen.append((dict(inputs), outputs))
        return outputs


def test_a_request_that_fills_a_batch_exactly_is_passed_without_copies():
    runner = RecordingRunner()
    request = rows(0, 4)

    async def scenario(batcher):
        return await batcher.run(request)

    result = run_batcher(runner, batching(max_batch_size=4), scenario)
    np.testing.assert_array_equal(result["id"], request["x"][:, 0])
    np.testing.assert_array_equal(result["y"], expected(request))
    assert runner.sizes() == [4]
    [(given, returned)] = runner.seen
    # The runner got the caller's own array, and the caller got the runner's own outputs.
    assert given["x"] is request["x"]
    for name in ("id", "y"):
        assert np.shares_memory(result[name], returned[name]), name


@pytest.mark.parametrize("instances", [1, 2])
def test_one_bad_request_fails_alone_and_its_batch_mates_get_their_rows(instances):
    runner = FakeRunner()
    good_a, bad, good_b = rows(0, 2), rows(10, 1, value=POISON - 10), rows(20, 1)

    async def scenario(batcher):
        return await asyncio.gather(
            *(batcher.run(r) for r in (good_a, bad, good_b)), return_exceptions=True
        )

    settings = BatchingSettings(8, 50.0, 64, instances=instances)
    result_a, error, result_b = run_batcher(runner, settings, scenario)
    assert isinstance(error, RuntimeError) and "poisoned" in str(error)
    np.testing.assert_array_equal(result_a["y"], expected(good_a))
    np.testing.assert_array_equal(result_b["y"], expected(good_b))
    assert runner.batches == [[0, 1, 10, 20], [0, 1], [10], [20]]  # failed run, then each alone


def test_a_failing_run_fails_only_its_own_batch():
    runner = FakeRunner()
    bad, later = rows(0, 1, value=POISON), rows(10, 2)

    async def scenario(batcher):
        with pytest.raises(RuntimeError, match="poisoned"):
            await batcher.run(bad)
        return await batcher.run(later), batcher.stats.failed_runs

    result, failed_runs = run_batcher(runner, batching(max_queue_delay_ms=0), scenario)
    np.testing.assert_array_equal(result["y"], expected(later))
    assert failed_runs == 1


# The longest delay settings allow: a call that waits for company outlasts bounded()'s timeout
# (half of it), which fails the test; a call that does not wait takes microseconds.
HOLD_MS = 10_000.0


async def bounded(call):
    return await asyncio.wait_for(call, HOLD_MS / 2000)


def test_a_lone_caller_never_waits_for_company():
    runner = FakeRunner()

    async def scenario(batcher):
        for i in range(3):
            await bounded(batcher.run(rows(i, 1)))

    run_batcher(runner, batching(max_queue_delay_ms=HOLD_MS), scenario)
    assert runner.sizes() == [1, 1, 1]


def test_policy_always_makes_even_a_lone_caller_wait_the_delay():
    runner = FakeRunner()
    delay_ms = 30.0

    async def scenario(batcher):
        start = time.monotonic()
        await bounded(batcher.run(rows(0, 1)))
        return time.monotonic() - start

    settings = BatchingSettings(4, delay_ms, 64, queue_delay_policy="always")
    waited_s = run_batcher(runner, settings, scenario)
    assert runner.sizes() == [1]
    # Time is the feature (the delay itself); only a lower bound, which a slow machine can't
    # break, with 10 % off because the loop's timer may fire a little early.
    assert waited_s >= delay_ms / 1000 * 0.9


def cores(monkeypatch, busy: bool) -> None:
    """Make the batcher see every core busy (or one idle), whatever this machine is doing."""
    monkeypatch.setattr(batch_policy.CpuLoad, "saturated", lambda self: busy)


def test_after_a_shared_batch_a_request_waits_the_delay_for_company_when_no_core_is_idle(
    monkeypatch,
):
    cores(monkeypatch, busy=True)
    runner = FakeRunner(gate=threading.Event())
    delay_ms = 30.0

    async def scenario(batcher):
        busy = asyncio.ensure_future(batcher.run(rows(0, 1)))
        await started(runner)
        pair = [asyncio.ensure_future(batcher.run(rows(10 + i, 1))) for i in range(2)]
        await asyncio.sleep(0)  # both queue while the runner is busy: they share the next batch
        runner.gate.set()
        await asyncio.gather(busy, *pair)
        start = time.monotonic()
        await bounded(batcher.run(rows(20, 1)))
        return time.monotonic() - start

    waited_s = run_batcher(runner, batching(max_queue_delay_ms=delay_ms), scenario)
    assert runner.batches == [[0], [10, 11], [20]]
    # Time is the feature (the delay); a lower bound only, 10 % off for an early timer.
    assert waited_s >= delay_ms / 1000 * 0.9


def after_a_shared_batch(first_rows: int, then_rows: int):
    """A scenario: a shared batch, then a request of ``then_rows`` rows alone; its wait."""

    async def scenario(batcher):
        busy = asyncio.ensure_future(batcher.run(rows(0, first_rows)))
        await started(batcher._runner)
        pair = [asyncio.ensure_future(batcher.run(rows(100 + 10 * i, 1))) for i in range(2)]
        await asyncio.sleep(0)  # both queue while the runner is busy: they share the next batch
        batcher._runner.gate.set()
        await asyncio.gather(busy, *pair)
        await bounded(batcher.run(rows(200, then_rows)))  # never ends if it waits

    return scenario


def test_with_a_core_idle_a_request_never_waits_for_company(monkeypatch):
    cores(monkeypatch, busy=False)
    runner = FakeRunner(gate=threading.Event())
    run_batcher(runner, batching(max_queue_delay_ms=HOLD_MS), after_a_shared_batch(1, 1))
    assert runner.batches == [[0], [100, 110], [200]]


class CostlyRunner(FakeRunner):
    """A run costs ``per_row_s`` per row (a busy wait): its cost is mostly per row."""

    def __init__(self, per_row_s: float):
        super().__init__(gate=threading.Event())
        self.per_row_s = per_row_s

    def run(self, inputs):
        deadline = time.perf_counter() + self.per_row_s * len(inputs["x"])
        while time.perf_counter() < deadline:
            pass
        return super().run(inputs)


def test_rows_whose_run_is_mostly_per_row_cost_never_wait_even_on_busy_cores(monkeypatch):
    # Time is the feature (measured run costs). 1 ms a row: a 16-row run measures ~16x a
    # 1-row run, far past FIXED_COST_FACTOR on any machine.
    cores(monkeypatch, busy=True)
    runner = CostlyRunner(per_row_s=0.001)
    settings = batching(max_batch_size=64, max_queue_delay_ms=HOLD_MS)
    run_batcher(runner, settings, after_a_shared_batch(16, 16))
    assert runner.sizes() == [16, 2, 16]


def test_a_lone_small_request_skips_the_queue_with_the_queued_paths_stats(monkeypatch):
    events = []

    class Observer:
        def on_dequeue(self, queue_s):
            events.append("dequeue")

        def on_batch(self, rows, compute_s):
            events.append(("batch", rows))

        def on_request(self, total_s, ok):
            events.append(("request", ok))

    runner = ThreadRecordingRunner(run_s=0.0)

    async def scenario(batcher):
        await batcher.run(rows(0, 2))  # measured on the worker thread
        queued = batcher._queue.append
        monkeypatch.setattr(batcher._queue, "append", lambda r: pytest.fail("queued"))
        answer = await batcher.run(rows(10, 2))
        monkeypatch.setattr(batcher._queue, "append", queued)
        poisoned = rows(20, 2, value=POISON - 20)
        with pytest.raises(RuntimeError, match="poisoned row"):
            await batcher.run(poisoned)
        return answer, batcher.stats

    answer, stats = run_batcher(runner, batching(max_batch_size=8), scenario, observer=Observer())
    np.testing.assert_array_equal(answer["y"], expected(rows(10, 2)))
    assert runner.threads[1:] == [threading.main_thread().name] * 2
    assert events == ["dequeue", ("batch", 2), ("request", True)] * 2 + [
        "dequeue", ("batch", 2), ("request", False)
    ]  # fmt: skip
    assert (stats.batches, stats.rows, stats.inline_runs, stats.failed_runs) == (3, 6, 2, 1)
    assert stats.requests_per_batch == {1: 3} and stats.batch_sizes == {2: 3}


def test_a_batch_stops_waiting_once_every_recent_caller_is_queued(monkeypatch):
    # Two closed-loop callers, busy cores, a delay longer than the test may take: each round's
    # batch closes as soon as both are queued, since nobody else is on the way.
    cores(monkeypatch, busy=True)
    runner = FakeRunner()

    async def scenario(batcher):
        async def client(first: int) -> None:
            for i in range(3):
                await batcher.run(rows(first + i, 1))

        await bounded(asyncio.gather(client(0), client(10)))

    run_batcher(runner, batching(max_queue_delay_ms=HOLD_MS), scenario)
    assert runner.batches == [[0, 10], [1, 11], [2, 12]]


def test_company_is_forgotten_after_a_quiet_second():
    runner = FakeRunner(gate=threading.Event())
    clock = FakeClock()

    async def scenario(batcher):
        busy = asyncio.ensure_future(batcher.run(rows(0, 1)))
        await started(runner)
        pair = [asyncio.ensure_future(batcher.run(rows(10 + i, 1))) for i in range(2)]
        await asyncio.sleep(0)
        runner.gate.set()
        await bounded(asyncio.gather(busy, *pair))
        clock.now += COMPANY_MEMORY_S + 0.1
        await bounded(batcher.run(rows(20, 1)))  # never ends if it waits for company

    run_batcher(runner, batching(max_queue_delay_ms=HOLD_MS), scenario, clock=clock)
    assert runner.batches == [[0], [10, 11], [20]]


class ThreadRecordingRunner(FakeRunner):
    """Records the thread of each run; each run takes at least ``run_s``."""

    def __init__(self, run_s: float):
        super().__init__()
        self.run_s = run_s
        self.threads: list[str] = []

    def run(self, inputs):
        self.threads.append(threading.current_thread().name)
        deadline = time.perf_counter() + self.run_s
        while time.perf_counter() < deadline:
            pass
        return super().run(inputs)


# Time is the feature (a run's measured cost picks where it runs). The slow runner spins ten
# times the real threshold, a lower bound no slow machine breaks; the fast one is judged
# against a threshold of a second, so a preempted 2-row run still counts as cheap.
@pytest.mark.parametrize(
    "run_s, threshold_s, inline", [(0.0, 1.0, True), (10 * INLINE_RUN_S, INLINE_RUN_S, False)]
)
def test_runs_measured_cheaper_than_a_hand_off_run_on_the_event_loop(
    run_s, threshold_s, inline, monkeypatch
):
    monkeypatch.setattr(batch_policy, "INLINE_RUN_S", threshold_s)
    runner = ThreadRecordingRunner(run_s)

    async def scenario(batcher):
        for i in range(3):
            await batcher.run(rows(i, 2))
        await batcher.run(rows(10, 100))  # a size never measured: the worker thread
        return batcher.stats.inline_runs

    inline_runs = run_batcher(runner, batching(max_batch_size=128), scenario)
    main = threading.main_thread().name
    first, *same_size, larger = runner.threads
    assert first.startswith(THREAD_PREFIX)  # unmeasured: the worker thread measures it
    assert larger.startswith(THREAD_PREFIX)
    assert all((name == main) == inline for name in same_size)
    assert inline_runs == (2 if inline else 0)


def test_full_queue_raises_queue_full_and_admits_again_once_drained():
    runner = FakeRunner(gate=threading.Event())

    async def scenario(batcher):
        first = asyncio.ensure_future(batcher.run(rows(0, 1)))
        await started(runner)  # `first` is in the runner, the queue is empty
        queued = [asyncio.ensure_future(batcher.run(rows(10 + i, 1))) for i in range(2)]
        await asyncio.sleep(0)  # let both reach the queue
        with pytest.raises(QueueFull, match="max_queue_size"):
            await batcher.run(rows(99, 1))
        runner.gate.set()
        await asyncio.gather(first, *queued)
        return await batcher.run(rows(50, 1))

    result = run_batcher(runner, batching(max_queue_delay_ms=0, max_queue_size=2), scenario)
    np.testing.assert_array_equal(result["y"], expected(rows(50, 1)))
    assert 99 not in [i for batch in runner.batches for i in batch]


def test_cancelled_and_expired_requests_are_dropped_before_compute():
    runner = FakeRunner(gate=threading.Event())
    clock = FakeClock()

    async def scenario(batcher):
        busy = asyncio.ensure_future(batcher.run(rows(0, 1)))
        await started(runner)
        expiring = asyncio.ensure_future(batcher.run(rows(10, 1), deadline=clock.now + 1.0))
        cancelled = asyncio.ensure_future(batcher.run(rows(20, 1)))
        alive = asyncio.ensure_future(batcher.run(rows(30, 1), deadline=clock.now + 100.0))
        await asyncio.sleep(0)
        cancelled.cancel()
        clock.now += 2.0  # past `expiring`'s deadline, not `alive`'s
        runner.gate.set()
        await busy
        with pytest.raises(DeadlineExceeded, match="not computed"):
            await expiring
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await alive
        return batcher.stats

    stats = run_batcher(runner, batching(max_queue_delay_ms=0), scenario, clock=clock)
    assert runner.batches == [[0], [30]]
    assert (stats.expired, stats.cancelled) == (1, 1)


def test_stop_finishes_queued_requests_then_refuses_new_ones():
    runner = FakeRunner(gate=threading.Event())

    async def main():
        batcher = DynamicBatcher(runner, batching(max_batch_size=2), name="test")
        await batcher.start()
        pending = [asyncio.ensure_future(batcher.run(rows(10 * i, 3))) for i in range(3)]
        await started(runner)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0)
        with pytest.raises(NotServing):
            await batcher.run(rows(99, 1))
        runner.gate.set()
        results = await asyncio.gather(*pending)
        await stopping
        return results

    results = asyncio.run(main())
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], expected(rows(10 * i, 3)))
    assert sum(runner.sizes()) == 9


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    max_batch_size=st.integers(1, 10),
)
def test_every_request_gets_exactly_its_rows(sizes, max_batch_size):
    runner = FakeRunner()
    starts = np.cumsum([0, *sizes])[:-1] * 100
    requests = [rows(int(s), n) for s, n in zip(starts, sizes, strict=True)]

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.run(r) for r in requests))

    results = run_batcher(runner, batching(max_batch_size, max_queue_delay_ms=1.0), scenario)
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["id"], request["x"][:, 0])
        np.testing.assert_array_equal(result["y"], expected(request))
    assert max(runner.sizes()) <= max_batch_size
    assert sum(runner.sizes()) == sum(sizes)


class OrderedRunner(FakeRunner):
    """Holds the run that starts at id ``first`` until the run starting at ``then`` is done,
    so runs finish in the opposite order; records which method ran each batch."""

    def __init__(self, first: int, then: int, run_s: float = 0.0):
        super().__init__()
        self.first, self.then, self.run_s = first, then, run_s
        self.then_done = threading.Event()
        self.methods: list[str] = []

    def run(self, inputs):
        self.methods.append("run")
        return self._held(inputs)

    def run_small(self, inputs):
        self.methods.append("run_small")
        return self._held(inputs)

    def _held(self, inputs):
        deadline = time.perf_counter() + self.run_s
        while time.perf_counter() < deadline:
            pass
        head = int(inputs["x"][0, 0])
        if head == self.first:
            assert self.then_done.wait(WAIT_S), "the other run never finished"
        outputs = FakeRunner.run(self, inputs)
        if head == self.then:
            self.then_done.set()
        return outputs


def instances(count: int, max_batch_size: int = 128) -> BatchingSettings:
    return BatchingSettings(max_batch_size, 0.0, 64, instances=count)


def test_runs_on_several_instances_overlap_and_rows_come_back_in_order():
    runner = OrderedRunner(first=0, then=128)  # the first half finishes last
    request = rows(0, 256)

    async def scenario(batcher):
        return await batcher.run(request)

    result = run_batcher(runner, instances(2), scenario)
    np.testing.assert_array_equal(result["id"], request["x"][:, 0])
    np.testing.assert_array_equal(result["y"], expected(request))
    assert sorted(runner.batches) == [list(range(128)), list(range(128, 256))]
    assert runner.methods == ["run_small", "run_small"]  # single-threaded runs


@pytest.mark.parametrize("count, runs", [(256, [128, 128]), (100, [64, 36]), (40, [40])])
def test_idle_instances_share_the_queued_rows(count, runs):
    runner = FakeRunner()

    async def scenario(batcher):
        return await batcher.run(rows(0, count))

    run_batcher(runner, instances(2, max_batch_size=1024), scenario)
    assert sorted(runner.sizes(), reverse=True) == runs


def test_one_instance_runs_batches_one_at_a_time_on_the_multithreaded_session():
    runner = OrderedRunner(first=-1, then=-1, run_s=10 * INLINE_RUN_S)  # never inline

    async def scenario(batcher):
        return await batcher.run(rows(0, 256))

    run_batcher(runner, instances(1), scenario)
    assert runner.sizes() == [128, 128]
    assert runner.methods == ["run", "run"]


def test_stop_waits_for_runs_in_flight_on_every_instance():
    runner = FakeRunner(gate=threading.Event())

    async def scenario(batcher):
        calls = [asyncio.ensure_future(batcher.run(rows(i * 100, 100))) for i in range(2)]
        await started(runner)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done() and not any(c.done() for c in calls)
        runner.gate.set()
        results = await asyncio.gather(*calls)
        await stopping
        return results

    results = run_batcher(runner, instances(2), scenario)
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], expected(rows(i * 100, 100)))
