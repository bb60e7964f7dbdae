"""The scheduler-to-stream event buffer: nothing lost or reordered across threads, takes spaced out."""

import asyncio
import threading
import time

from oppu.serving.event_buffer import EventBuffer


def test_every_item_arrives_once_in_order_from_another_thread():
    async def main():
        buffer = EventBuffer(asyncio.get_running_loop())
        n = 20_000

        def produce():
            for i in range(n):
                buffer.put(i)
                if i % 1000 == 0:
                    time.sleep(0.001)  # let the consumer catch up now and then: empty takes must not end it

        thread = threading.Thread(target=produce)
        thread.start()
        got, takes = [], 0
        while len(got) < n:
            got.extend(await asyncio.wait_for(buffer.take(), timeout=10))
            takes += 1
        thread.join()
        return got, takes

    got, takes = asyncio.run(main())
    assert got == list(range(20_000))
    assert 1 <= takes < 20_000  # items that arrived together were taken together


def test_first_take_is_immediate_and_later_takes_are_spaced_by_the_interval():
    async def main():
        loop = asyncio.get_running_loop()
        buffer = EventBuffer(loop, min_interval_s=0.2)
        buffer.put("first")
        started = loop.time()
        assert await buffer.take() == ["first"]
        first_s = loop.time() - started
        buffer.put("a")
        buffer.put("b")
        assert await buffer.take() == ["a", "b"]
        second_s = loop.time() - started
        return first_s, second_s

    first_s, second_s = asyncio.run(main())
    assert first_s < 0.1
    assert second_s >= 0.2 - 1e-3


def test_a_put_during_the_wait_is_taken_with_the_rest():
    async def main():
        loop = asyncio.get_running_loop()
        buffer = EventBuffer(loop, min_interval_s=0.1)
        buffer.put(1)
        await buffer.take()
        buffer.put(2)
        loop.call_later(0.05, buffer.put, 3)  # arrives while take() sleeps out the interval
        return await buffer.take()

    assert asyncio.run(main()) == [2, 3]
