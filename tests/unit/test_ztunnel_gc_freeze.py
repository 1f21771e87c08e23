"""ztunnel start-up moves its import-time heap out of the GC's reach: full collections scan only traffic objects."""
import gc

from ztunnel.__main__ import _freeze_startup_heap


def test_startup_heap_is_frozen_and_full_collections_skip_it():
    gc.collect()
    tracked_before = len(gc.get_objects())
    try:
        _freeze_startup_heap()
        assert gc.get_freeze_count() >= tracked_before // 2  # the modules, classes and config alive now
        assert len(gc.get_objects()) < tracked_before // 10  # what a full collection still has to scan
        garbage = [[] for _ in range(100)]
        for x in garbage:
            x.append(x)  # cycles made after start-up are still collected
        del garbage, x
        assert gc.collect() >= 100
    finally:
        gc.unfreeze()
