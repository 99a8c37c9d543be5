"""The split topology's ingress-side grouping (service/grouping.py): pure asyncio, no Ray."""

from __future__ import annotations

import asyncio

import pytest

from service.grouping import Grouper


class Model:
    """Stands for the model deployment: records each call's items, answers item * 10 after `delay_s`."""

    def __init__(self, delay_s: float = 0.02):
        self.delay_s = delay_s
        self.calls: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        await asyncio.sleep(self.delay_s)
        return [i * 10 for i in items]


def run(coro):
    return asyncio.run(coro)


def test_a_lone_request_is_sent_at_once():
    async def main():
        model = Model()
        grouper = Grouper(model, max_items=32, wait_s=1.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await grouper.submit([1, 2]) == [10, 20]
        return loop.time() - start, model.calls

    took, calls = run(main())
    assert calls == [[1, 2]]
    assert took < 0.5  # not the 1 s group wait: nothing was in flight to wait behind


def test_requests_arriving_while_a_call_is_in_flight_share_one_call():
    async def main():
        model = Model(delay_s=0.05)
        grouper = Grouper(model, max_items=32, wait_s=0.2)
        first = asyncio.create_task(grouper.submit([0]))
        await asyncio.sleep(0.01)  # the first call is in flight now
        rest = [asyncio.create_task(grouper.submit([i, i + 100])) for i in range(1, 6)]
        answers = await asyncio.gather(first, *rest)
        return answers, model.calls

    answers, calls = run(main())
    assert answers[0] == [0]
    assert answers[1:] == [[i * 10, (i + 100) * 10] for i in range(1, 6)]  # each caller gets its own, in order
    # one call for the lone first request, one for the five that came while it was in flight (sent when
    # the first came back, before the 0.2 s wait was over)
    assert calls == [[0], [1, 101, 2, 102, 3, 103, 4, 104, 5, 105]]


def test_a_group_leaves_when_full_and_a_request_is_never_split():
    async def main():
        model = Model(delay_s=0.05)
        grouper = Grouper(model, max_items=4, wait_s=0.5)
        first = asyncio.create_task(grouper.submit([0]))
        await asyncio.sleep(0.01)
        tasks = [asyncio.create_task(grouper.submit(items)) for items in ([1, 2], [3, 4, 5], [6], [7, 8, 9, 10, 11])]
        answers = await asyncio.gather(first, *tasks)
        return answers, model.calls

    answers, calls = run(main())
    assert answers[-1] == [70, 80, 90, 100, 110]
    # [1, 2] + [3, 4, 5] would exceed 4: [1, 2] leaves; [3, 4, 5] + [6] is full: leaves; the
    # 5-item request is larger than a group and goes alone, whole.
    assert calls[0] == [0]
    assert sorted(map(tuple, calls[1:])) == sorted([(1, 2), (3, 4, 5, 6), (7, 8, 9, 10, 11)])
    assert max(len(c) for c in calls[1:3]) <= 4


def test_a_caller_that_gave_up_before_its_group_left_is_not_sent():
    async def main():
        model = Model(delay_s=0.05)
        grouper = Grouper(model, max_items=32, wait_s=0.5)
        first = asyncio.create_task(grouper.submit([0]))
        await asyncio.sleep(0.01)
        quitter = asyncio.create_task(grouper.submit([1]))
        stayer = asyncio.create_task(grouper.submit([2]))
        await asyncio.sleep(0.005)
        quitter.cancel()
        answers = await asyncio.gather(first, stayer)
        return answers, model.calls, quitter.cancelled()

    answers, calls, cancelled = run(main())
    assert cancelled and answers == [[0], [20]]
    assert calls == [[0], [2]]


def test_a_failed_call_fails_every_caller_in_its_group_and_the_next_group_still_runs():
    async def main():
        attempts = []

        async def flaky(items: list[int]) -> list[int]:
            attempts.append(list(items))
            await asyncio.sleep(0.02)
            if items == [1]:
                raise RuntimeError("replica died")
            return [-i for i in items]

        grouper = Grouper(flaky, max_items=32, wait_s=0.01)
        first = asyncio.create_task(grouper.submit([1]))
        await asyncio.sleep(0.005)
        second = asyncio.create_task(grouper.submit([2]))
        results = await asyncio.gather(first, second, return_exceptions=True)
        return results, attempts, grouper.in_flight

    results, attempts, in_flight = run(main())
    assert isinstance(results[0], RuntimeError) and results[1] == [-2]
    assert attempts == [[1], [2]] and in_flight == 0


def test_a_model_that_answers_the_wrong_number_of_results_is_an_error_not_a_shift():
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    with pytest.raises(RuntimeError, match="answered 1 results for 2 items"):
        run(Grouper(short, max_items=8, wait_s=0.01).submit([1, 2]))
