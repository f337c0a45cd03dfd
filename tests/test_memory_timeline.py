"""The memory accounting the memory test and the MLM-head benchmark rely on."""
from tests.memory_timeline import memory_from_timeline


def test_a_result_made_after_the_peak_does_not_hide_it():
    # 100 bytes of logits, freed; then a 40-byte result kept: 100 were held beyond results.
    timeline = [(1, 100), (1, -100), (2, 40)]
    assert memory_from_timeline(timeline) == (100, 40, 100)


def test_results_made_early_are_not_transient_and_reused_addresses_are_told_apart():
    # A kept 40-byte result, then 30 bytes of scratch at an address a freed block used before.
    timeline = [(7, 10), (7, -10), (2, 40), (7, 30), (7, -30)]
    assert memory_from_timeline(timeline) == (70, 40, 30)


def test_freeing_memory_allocated_before_the_step_lowers_the_running_sum():
    timeline = [(9, -50), (1, 20), (1, -20), (2, 5)]
    assert memory_from_timeline(timeline) == (0, 5, 0)
