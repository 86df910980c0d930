"""PyTorch threads per task: the aggregation task raises its own thread's count for the
server's evaluation without changing what the embedded worker's training consumers use."""

import threading

import torch
from django.test import override_settings

from workers.tasks import limit_torch_threads, torch_threads


def in_thread(work):
    """Run ``work`` in a thread of its own, as an embedded consumer would, and return its
    result."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", work()))
    thread.start()
    thread.join(30)
    return result["value"]


@override_settings(FEDLENS_TORCH_THREADS=1)
def test_an_aggregation_raising_its_threads_leaves_a_training_consumer_at_its_share():
    consumer_pinned, aggregation_started, aggregation_may_end = (threading.Event() for _ in "abc")
    seen = {}

    def training_consumer():
        limit_torch_threads()
        consumer_pinned.set()
        aggregation_started.wait(30)
        seen["consumer during aggregation"] = torch.get_num_threads()
        aggregation_may_end.set()

    def aggregation():
        consumer_pinned.wait(30)
        limit_torch_threads()
        with torch_threads(2):
            seen["aggregation"] = torch.get_num_threads()
            aggregation_started.set()
            aggregation_may_end.wait(30)
        seen["aggregation's thread after"] = torch.get_num_threads()

    threads = [threading.Thread(target=training_consumer), threading.Thread(target=aggregation)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert seen == {
        "aggregation": 2,
        "consumer during aggregation": 1,
        "aggregation's thread after": 1,
    }


@override_settings(FEDLENS_TORCH_THREADS=1)
def test_a_task_in_a_thread_that_inherited_a_raised_count_computes_with_its_share():
    with torch_threads(2):
        # A consumer thread whose first PyTorch work falls inside another's raised count.
        inherited = in_thread(torch.get_num_threads)
        at_task_start = in_thread(lambda: (limit_torch_threads(), torch.get_num_threads())[1])

    assert (inherited, at_task_start) == (2, 1)
