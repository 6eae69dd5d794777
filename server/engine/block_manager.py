"""Paged KV-cache bookkeeping: which fixed-size blocks each request owns, with ref counts and prefix caching.

Pure Python, no torch: the KV tensors live in the model runner; this module only hands out block ids.

Prefix caching: a block that is full of computed tokens gets a hash chained over everything before it
(hash(parent block's hash, this block's token ids)), so equal hashes mean equal whole prefixes. Freed blocks
keep their hash and stay findable until they are popped for reuse (lazy eviction), and the free queue is in
LRU order, so the blocks freed longest ago are reused first.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from server.engine.request import Request


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained digest of one full block. Python's hash() is 64-bit and salted per process; blake2b with a
    256-bit digest makes a collision (which would silently serve another prompt's KV) negligible."""
    hasher = hashlib.blake2b(digest_size=32)
    hasher.update(parent_hash or b"")
    hasher.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return hasher.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None   # set once the block is full and registered in the prefix cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        # Ref-0 blocks, oldest-freed first. An OrderedDict gives O(1) pop of the oldest and O(1) removal from
        # the middle (a cached free block taken back by a prefix hit).
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached_block_by_hash: dict[bytes, int] = {}
        # Per request: the hash chain of its first len(...) blocks, i.e. the blocks already registered.
        # Kept here (not on Request) because it is bookkeeping of this cache only; dropped by free().
        self._request_block_hashes: dict[str, list[bytes]] = {}
        # Prefix-cache metrics, in tokens (counted once per admission, see allocate_slots).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free_queue) / self.num_blocks

    # ---- prefix cache lookup ----

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest run of cached full blocks matching the start of the request's tokens: (block ids, tokens).

        Takes no references. At most (num_tokens - 1) // block_size blocks, so at least one token is left to
        compute and the model produces the logits for the next token. num_tokens includes outputs, so a request
        preempted after generating can reuse the blocks of its own outputs."""
        if not self.enable_prefix_caching:
            return [], 0
        block_ids: list[int] = []
        parent_hash = None
        for index in range((request.num_tokens - 1) // self.block_size):
            parent_hash = hash_block_tokens(parent_hash, self._block_tokens(request, index))
            block_id = self._cached_block_by_hash.get(parent_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    # ---- allocation ----

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> bool:
        """Grow request.block_ids to hold num_computed_tokens + len(computed_blocks) * block_size + num_new_tokens
        tokens. computed_blocks (from get_computed_blocks, only at admission) are shared by reference.

        Returns False and changes nothing when the free pool is too small. Pass computed_blocks (even []) only
        when the prefix cache was looked up: the hit metrics are counted here, on success, so a request blocked
        at the head of the waiting queue and looked up again every step is counted once."""
        if computed_blocks is None and (request.num_computed_tokens + num_new_tokens
                                        <= len(request.block_ids) * self.block_size):
            return True   # the common decode step: the token fits the request's last block
        computed = computed_blocks or []
        if computed and request.block_ids:
            raise ValueError("computed_blocks can only be given when the request holds no blocks")
        num_tokens = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        num_blocks_needed = -(-num_tokens // self.block_size) - len(request.block_ids) - len(computed)
        # Cached hits sitting in the free queue leave it when referenced, so they count against the pool too.
        num_hits_in_free_queue = sum(1 for block_id in computed if self.blocks[block_id].ref_count == 0)
        if max(num_blocks_needed, 0) + num_hits_in_free_queue > len(self._free_queue):
            return False

        if computed_blocks is not None and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(computed) * self.block_size
        for block_id in computed:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free_queue[block_id]
            block.ref_count += 1
            request.block_ids.append(block_id)
        if computed:
            self._request_block_hashes[request.request_id] = [self.blocks[b].block_hash for b in computed]
        for _ in range(num_blocks_needed):
            request.block_ids.append(self._pop_free_block())
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self._free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:   # lazy eviction: the cached content is being overwritten now
            if self._cached_block_by_hash.get(block.block_hash) == block_id:
                del self._cached_block_by_hash[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def free(self, request: Request) -> None:
        """Drop the request's references. Reverse order: the tail of a sequence (least likely to be shared by
        a later prompt) enters the free queue first and so is evicted first."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free_queue[block_id] = None
        request.block_ids.clear()
        self._request_block_hashes.pop(request.request_id, None)

    # ---- registering new full blocks ----

    def cache_full_blocks(self, request: Request) -> None:
        """Register the hashes of blocks that became full of computed tokens (prompt or output) since the last
        call. O(new blocks): the request's hash chain so far is remembered."""
        if not self.enable_prefix_caching:
            return
        num_full_blocks = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        hashes = self._request_block_hashes.setdefault(request.request_id, [])
        for index in range(len(hashes), num_full_blocks):
            block_hash = hash_block_tokens(hashes[-1] if hashes else None, self._block_tokens(request, index))
            hashes.append(block_hash)
            block = self.blocks[request.block_ids[index]]
            # Two requests that computed the same prefix at once hold equal blocks; the first one registered
            # stays the cached copy and the other is left unhashed (plainly freed later).
            if block.block_hash is None and block_hash not in self._cached_block_by_hash:
                block.block_hash = block_hash
                self._cached_block_by_hash[block_hash] = block.block_id

    def _block_tokens(self, request: Request, index: int) -> list[int]:
        # Slices prompt and output separately: building all_token_ids would cost O(sequence) per call.
        start, end = index * self.block_size, (index + 1) * self.block_size
        prompt, num_prompt = request.prompt_token_ids, request.num_prompt_tokens
        if end <= num_prompt:
            return prompt[start:end]
        if start >= num_prompt:
            return request.output_token_ids[start - num_prompt:end - num_prompt]
        return prompt[start:] + request.output_token_ids[:end - num_prompt]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only when no block is in use (as in vLLM): running requests' hash chains
        would otherwise point at blocks that are no longer registered. Returns whether it was reset."""
        if len(self._free_queue) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached_block_by_hash.clear()
        return True
