"""ForwardPacer (service/pacing.py): the gate that lets the next batch form just before the forward
thread is free. Pure asyncio, real clock, short durations."""

from __future__ import annotations

import asyncio

import pytest

from service.pacing import ForwardPacer, Shed


def test_prediction_interpolates_between_measured_sizes_and_scales_beyond():
    pacer = ForwardPacer(0.0, seed_durations_s={1: 0.010, 8: 0.040, 32: 0.160})
    assert pacer.predict_s(1) == pytest.approx(0.010)
    assert pacer.predict_s(4) == pytest.approx(0.010 + 3 / 7 * 0.030)
    assert pacer.predict_s(20) == pytest.approx(0.040 + 12 / 24 * 0.120)
    assert pacer.predict_s(64) == pytest.approx(0.320)  # per image beyond the largest measured
    assert ForwardPacer(0.0).predict_s(16) == 0.0  # nothing measured yet: no wait


def test_measurements_move_the_prediction_smoothly():
    pacer = ForwardPacer(0.0, seed_durations_s={32: 0.100}, smoothing=0.5)
    pacer.observe(32, 0.200)
    assert pacer.predict_s(32) == pytest.approx(0.150)
    pacer.observe(16, 0.050)  # a new size is taken as measured
    assert pacer.predict_s(16) == pytest.approx(0.050)


def test_gate_is_open_while_idle_and_closes_for_a_long_batch():
    async def scenario():
        pacer = ForwardPacer(lead_s=0.005, seed_durations_s={32: 0.200})
        assert pacer.idle
        await asyncio.wait_for(pacer.wait_turn(), 0.01)  # idle: no wait at all
        token = pacer.submitted(32)
        assert not pacer.idle
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pacer.wait_turn(), 0.05)  # 200 ms to go: hold
        pacer.finished(token, 0.21)
        await asyncio.wait_for(pacer.wait_turn(), 0.01)
        assert pacer.idle

    asyncio.run(scenario())


def test_gate_opens_lead_before_the_running_batch_is_predicted_to_end():
    async def scenario():
        loop = asyncio.get_running_loop()
        pacer = ForwardPacer(lead_s=0.300, seed_durations_s={32: 0.400})
        start = loop.time()
        pacer.submitted(32)
        await asyncio.wait_for(pacer.wait_turn(), 5.0)
        return loop.time() - start

    waited = asyncio.run(scenario())
    # Relations, not a window a loaded machine could miss: the gate stays shut until the lead
    # (400 - 300 ms; timers never fire early), and opens before the batch is predicted to end
    # (a pacer that waits for the end would take 400 ms; 300 ms of slack for a slow scheduler).
    assert 0.100 - 0.002 <= waited < 0.400, waited


def test_a_queued_batch_keeps_the_gate_shut_until_it_runs():
    async def scenario():
        pacer = ForwardPacer(lead_s=0.005, seed_durations_s={1: 0.001, 32: 0.001})
        first = pacer.submitted(32)  # running
        second = pacer.submitted(32)  # queued behind it: the next requests must wait for a third batch
        await asyncio.sleep(0.02)  # past both predictions: still shut while two are in the pool
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pacer.wait_turn(), 0.02)
        pacer.finished(first, 0.001)  # the queued one runs now and ends within lead_s
        await asyncio.wait_for(pacer.wait_turn(), 0.02)
        pacer.finished(second, None)  # a failed batch: no measurement, the pool still empties
        assert pacer.idle and pacer.predict_s(32) == pytest.approx(0.001)

    asyncio.run(scenario())


def test_two_lanes_take_two_batches_before_the_gate_holds():
    async def scenario():
        pacer = ForwardPacer(lead_s=0.005, seed_durations_s={32: 0.200}, lanes=2)
        first = pacer.submitted(32)
        await asyncio.wait_for(pacer.wait_turn(), 0.01)  # the second lane is free: no wait
        assert pacer.running == 1
        second = pacer.submitted(32)
        assert pacer.running == 2
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pacer.wait_turn(), 0.05)  # both busy for ~200 ms: hold
        third = pacer.submitted(32)  # handed over anyway (a request already past the gate): it queues
        assert pacer.running == 2
        pacer.finished(second, 0.2)  # lanes finish out of order; the queued batch takes the free lane
        assert pacer.running == 2
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pacer.wait_turn(), 0.02)
        pacer.finished(first, 0.2)
        await asyncio.wait_for(pacer.wait_turn(), 0.01)  # one lane free again
        pacer.finished(third, 0.2)
        assert pacer.idle

    asyncio.run(scenario())


def test_shed_refuses_the_newest_requests_at_the_gate_within_the_window():
    async def scenario():
        pacer = ForwardPacer(lead_s=0.005, seed_durations_s={32: 10.0})
        token = pacer.submitted(32)  # a 10 s batch: the gate stays shut
        old = asyncio.ensure_future(pacer.wait_turn())
        await asyncio.sleep(0.1)  # this one came 100 ms before the overload
        recent = [asyncio.ensure_future(pacer.wait_turn()) for _ in range(4)]
        gone = asyncio.ensure_future(pacer.wait_turn())
        await asyncio.sleep(0.01)
        gone.cancel()  # its caller timed out: not counted as shed
        await asyncio.sleep(0)
        assert pacer.waiting == 5
        assert pacer.shed(at_most=3, window_s=0.05) == 3  # the three newest live ones
        assert pacer.waiting == 2
        assert pacer.shed(at_most=10, window_s=0.05) == 1  # the last recent one; the old one stays
        await asyncio.sleep(0)
        for waiter in recent:
            assert isinstance(waiter.exception(), Shed)
        assert not old.done()
        pacer.finished(token, None)  # the gate opens: the one left passes
        await asyncio.wait_for(old, 0.1)
        assert pacer.waiting == 0 and pacer.shed(10, 1.0) == 0

    asyncio.run(scenario())
