"""BlockManager: allocation, ref counts, chained prefix hashes, LRU eviction of cached free blocks."""
from __future__ import annotations

import pytest

from server.engine.block_manager import BlockManager, hash_block_tokens
from server.engine.request import Request
from server.engine.sampling import SamplingParams

BLOCK = 4


def make_request(request_id: str, prompt: list[int], output: list[int] | None = None) -> Request:
    request = Request(request_id, list(prompt), SamplingParams(max_tokens=8))
    request.output_token_ids = list(output or [])
    return request


def compute_all(manager: BlockManager, request: Request, computed_blocks=None) -> None:
    """Allocate the request's uncomputed tokens and mark them computed, as one scheduler step + update would."""
    num_cached = len(computed_blocks or []) * BLOCK
    num_new = request.num_tokens - num_cached
    assert manager.allocate_slots(request, num_new, computed_blocks)
    request.num_computed_tokens = request.num_tokens
    manager.cache_full_blocks(request)


def ref_counts(manager: BlockManager) -> list[int]:
    return [block.ref_count for block in manager.blocks]


def test_allocate_grows_and_free_returns_everything():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    request = make_request("a", list(range(10)))
    assert manager.allocate_slots(request, 10)
    assert len(request.block_ids) == 3 and manager.num_free_blocks == 5
    assert manager.usage == pytest.approx(3 / 8)
    request.num_computed_tokens = 10
    assert manager.allocate_slots(request, 2)          # 12 tokens: still 3 blocks
    assert len(request.block_ids) == 3
    assert manager.allocate_slots(request, 3)          # 13 tokens: a 4th block
    assert len(request.block_ids) == 4
    manager.free(request)
    assert request.block_ids == [] and manager.num_free_blocks == 8 and manager.usage == 0.0
    assert ref_counts(manager) == [0] * 8


def test_allocate_fails_without_changing_anything():
    manager = BlockManager(num_blocks=2, block_size=BLOCK, enable_prefix_caching=False)
    request = make_request("a", list(range(9)))
    assert not manager.allocate_slots(request, 9)      # needs 3 blocks
    assert request.block_ids == [] and manager.num_free_blocks == 2
    assert manager.allocate_slots(request, 8)


def test_hash_is_chained_over_the_prefix():
    first = hash_block_tokens(None, [1, 2, 3, 4])
    assert first == hash_block_tokens(None, [1, 2, 3, 4])
    assert first != hash_block_tokens(None, [1, 2, 3, 5])
    # Same tokens after a different prefix: a different block.
    assert hash_block_tokens(first, [5, 6, 7, 8]) != hash_block_tokens(hash_block_tokens(None, [0, 2, 3, 4]),
                                                                       [5, 6, 7, 8])


def test_caching_off_finds_nothing_and_hashes_nothing():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    compute_all(manager, make_request("a", list(range(12))))
    assert all(block.block_hash is None for block in manager.blocks)
    assert manager.get_computed_blocks(make_request("b", list(range(12)))) == ([], 0)


def test_prefix_hit_in_whole_blocks_and_shared_ref_count():
    manager = BlockManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    first = make_request("a", list(range(10)))            # 2 full blocks + 2 tokens
    compute_all(manager, first)
    second = make_request("b", list(range(9)) + [99, 98])  # shares 9 tokens = 2 whole blocks + 1
    counts_before = ref_counts(manager)
    blocks, num_tokens = manager.get_computed_blocks(second)
    assert blocks == first.block_ids[:2] and num_tokens == 8
    assert ref_counts(manager) == counts_before            # lookup takes no references
    compute_all(manager, second, blocks)
    assert second.block_ids[:2] == first.block_ids[:2]
    assert [manager.blocks[b].ref_count for b in second.block_ids[:2]] == [2, 2]
    # Only admissions that looked the cache up are counted (the first one passed no computed_blocks).
    assert manager.prefix_cache_queries == 11 and manager.prefix_cache_hits == 8
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 16 and ref_counts(manager) == [0] * 16


def test_never_the_whole_prompt():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    compute_all(manager, make_request("a", list(range(8))))
    # An identical prompt of exactly 2 blocks: only 1 block may be reused, the last token must run.
    assert manager.get_computed_blocks(make_request("b", list(range(8)))) == ([0], 4)
    assert manager.get_computed_blocks(make_request("c", list(range(9))))[1] == 8


def test_cached_blocks_survive_free_and_are_taken_out_of_the_free_queue():
    manager = BlockManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)
    first = make_request("a", list(range(9)))
    compute_all(manager, first)
    cached = first.block_ids[:2]
    manager.free(first)
    assert manager.num_free_blocks == 4
    second = make_request("b", list(range(9)))
    blocks, _ = manager.get_computed_blocks(second)
    assert blocks == cached
    compute_all(manager, second, blocks)                   # 2 hits leave the free queue, 1 fresh block
    assert manager.num_free_blocks == 1
    # Not enough room: 2 cached blocks in the free queue + 3 fresh ones > 4 free.
    manager.free(second)
    third = make_request("c", list(range(9)) + list(range(100, 112)))
    blocks, _ = manager.get_computed_blocks(third)
    assert not manager.allocate_slots(third, third.num_tokens - 8, blocks)
    assert manager.num_free_blocks == 4 and third.block_ids == []
    assert manager.prefix_cache_hits == 8                  # a failed admission is not counted


def test_lru_eviction_tail_first_and_oldest_first():
    manager = BlockManager(num_blocks=6, block_size=BLOCK, enable_prefix_caching=True)
    old = make_request("old", list(range(0, 9)))           # blocks 0, 1 full, 2 partial
    new = make_request("new", list(range(50, 59)))         # blocks 3, 4 full, 5 partial
    compute_all(manager, old)
    compute_all(manager, new)
    manager.free(old)                                      # freed first: reused first, tail block first
    manager.free(new)
    filler = make_request("filler", list(range(200, 208)))
    assert manager.allocate_slots(filler, 8)
    assert filler.block_ids == [2, 1]                      # old's partial tail, then its 2nd full block
    assert manager.get_computed_blocks(make_request("x", list(range(0, 9)))) == ([0], 4)
    assert manager.get_computed_blocks(make_request("y", list(range(50, 59)))) == ([3, 4], 8)


def test_output_tokens_are_hashed_incrementally():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    request = make_request("a", [1, 2, 3, 4, 5, 6])
    compute_all(manager, request)
    assert [manager.blocks[b].block_hash is not None for b in request.block_ids] == [True, False]
    for token in (7, 8, 9):                                # decode: tokens become computed one by one
        request.output_token_ids.append(token)
        assert manager.allocate_slots(request, 1)
        request.num_computed_tokens += 1
        manager.cache_full_blocks(request)
    assert [manager.blocks[b].block_hash is not None for b in request.block_ids] == [True, True, False]
    # A continuation of prompt + outputs (multi-turn) reuses both blocks.
    follow_up = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert manager.get_computed_blocks(follow_up) == (request.block_ids[:2], 8)


def test_duplicate_blocks_computed_at_once_stay_unhashed_and_free_cleanly():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    first, second = make_request("a", list(range(6))), make_request("b", list(range(6)))
    assert manager.allocate_slots(first, 6, []) and manager.allocate_slots(second, 6, [])
    for request in (first, second):
        request.num_computed_tokens = 6
        manager.cache_full_blocks(request)
    registered = first.block_ids[0]
    assert manager.blocks[registered].block_hash is not None
    assert manager.blocks[second.block_ids[0]].block_hash is None
    manager.free(first)
    manager.free(second)
    assert manager.get_computed_blocks(make_request("c", list(range(6)))) == ([registered], 4)
    assert manager.num_free_blocks == 8


def test_reset_prefix_cache_only_when_idle():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    request = make_request("a", list(range(9)))
    compute_all(manager, request)
    assert not manager.reset_prefix_cache()
    manager.free(request)
    assert manager.reset_prefix_cache()
    assert manager.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
