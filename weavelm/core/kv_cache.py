"""Paged KV block accounting: a block pool with ref counts and prefix caching, and per-request block tables.

Each full block is identified by a hash chained with its prefix's hash. A lookup hit also compares the parent hash
and the block's tokens, so a hash collision can never hand out wrong KV. Blocks whose ref count drops to zero go to
the back of the free queue but keep their hash: they can be reused by a later request with the same prefix until
they are evicted (the front of the free queue is evicted first, so the least recently freed block goes first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from weavelm.core.request import Request

NONE_HASH = 0


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.parent_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockPool:
    """All blocks, the free queue (LRU order) and the prefix-hash table."""

    def __init__(self, num_blocks: int, enable_caching: bool):
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def lookup(self, parent_hash: int, token_ids: tuple[int, ...]) -> KVCacheBlock | None:
        block = self.cached.get(hash_block(parent_hash, token_ids))
        if block is None or block.parent_hash != parent_hash or block.token_ids != token_ids:
            return None
        return block

    def take(self, n: int) -> list[KVCacheBlock]:
        """Allocate `n` blocks from the front of the free queue, evicting their cached hashes."""
        assert n <= len(self.free_queue), "caller must check can_allocate first"
        out = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Take a reference on cache hits (reviving them from the free queue when unreferenced)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one reference each; give `blocks` in eviction order (first is evicted first)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = None

    def cache(self, block: KVCacheBlock, parent_hash: int, token_ids: tuple[int, ...]) -> int:
        h = hash_block(parent_hash, token_ids)
        if block.block_hash is None and h not in self.cached:
            block.block_hash, block.parent_hash, block.token_ids = h, parent_hash, token_ids
            self.cached[h] = block
        return h

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = block.parent_hash = block.token_ids = None

    def num_cached_blocks(self) -> int:
        return len(self.cached)


@dataclass
class ComputedBlocks:
    """Prefix-cache hits for a request: blocks to share and the number of tokens they hold."""

    blocks: list[KVCacheBlock]
    num_tokens: int


class KVCacheManager:
    """Per-request block tables on top of a BlockPool. Used by schedulers; knows no policy."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_caching = enable_prefix_caching
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_hashed: dict[str, int] = {}  # blocks of the request already entered in the hash table
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / max(self.pool.num_blocks, 1)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def _update_hashes(self, request: Request) -> None:
        tokens, bs = request.all_token_ids, self.block_size
        hashes = request.block_hashes
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            parent = hashes[-1] if hashes else NONE_HASH
            hashes.append(hash_block(parent, tuple(tokens[i * bs:(i + 1) * bs])))

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """Longest cached prefix of the request's tokens, leaving at least one token to compute."""
        if not self.enable_caching:
            return ComputedBlocks([], 0)
        self._update_hashes(request)
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        hits: list[KVCacheBlock] = []
        parent = NONE_HASH
        for i in range(max_blocks):
            block = self.pool.lookup(parent, tuple(request.all_token_ids[i * bs:(i + 1) * bs]))
            if block is None:
                break
            hits.append(block)
            parent = block.block_hash
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * bs
        return ComputedBlocks(hits, len(hits) * bs)

    def blocks_needed(self, request: Request, num_new_tokens: int, computed: ComputedBlocks | None = None) -> int:
        have = len(self.req_blocks.get(request.request_id, ()))
        num_computed = request.num_computed_tokens + (computed.num_tokens if computed else 0)
        total = -(-(num_computed + num_new_tokens) // self.block_size)
        new = max(total - have - (len(computed.blocks) if computed else 0), 0)
        # reviving unreferenced cache hits takes them out of the free queue too
        revived = sum(1 for b in computed.blocks if b.ref_cnt == 0) if computed else 0
        return new + revived

    def can_allocate(self, request: Request, num_new_tokens: int, computed: ComputedBlocks | None = None) -> bool:
        return self.blocks_needed(request, num_new_tokens, computed) <= self.pool.num_free_blocks

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed: ComputedBlocks | None = None) -> list[int] | None:
        """Reserve blocks so the request's KV covers its computed tokens plus `num_new_tokens`.

        Returns the ids of the blocks added to its table (cache hits first), or None when they do not fit (then
        nothing changed). Full blocks are entered in the prefix-hash table as soon as their tokens are scheduled.
        """
        if not self.can_allocate(request, num_new_tokens, computed):
            return None
        rid = request.request_id
        table = self.req_blocks.setdefault(rid, [])
        added: list[KVCacheBlock] = []
        num_computed = request.num_computed_tokens
        if computed and computed.blocks:
            assert not table, "prefix hits are only taken for a request without blocks"
            self.pool.touch(computed.blocks)
            table.extend(computed.blocks)
            added.extend(computed.blocks)
            self.num_hashed[rid] = len(computed.blocks)
            num_computed += computed.num_tokens
        total = -(-(num_computed + num_new_tokens) // self.block_size)
        if total > len(table):
            fresh = self.pool.take(total - len(table))
            table.extend(fresh)
            added.extend(fresh)
        if self.enable_caching:
            self._cache_full_blocks(request, num_computed + num_new_tokens)
        return [b.block_id for b in added]

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        rid = request.request_id
        table = self.req_blocks[rid]
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.num_hashed.get(rid, 0)
        if num_full <= start:
            return
        self._update_hashes(request)
        bs = self.block_size
        for i in range(start, num_full):
            parent = request.block_hashes[i - 1] if i else NONE_HASH
            self.pool.cache(table[i], parent, tuple(request.all_token_ids[i * bs:(i + 1) * bs]))
        self.num_hashed[rid] = num_full

    def free(self, request: Request) -> None:
        """Release every block of the request; tail blocks are evicted before the shared prefix."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_hashed.pop(request.request_id, None)
        self.pool.free(list(reversed(blocks)))

    def check_invariants(self) -> None:
        """Ref counts equal table membership; free queue holds exactly the unreferenced blocks (tests)."""
        refs = [0] * self.pool.num_blocks
        for table in self.req_blocks.values():
            for b in table:
                refs[b.block_id] += 1
        for b in self.pool.blocks:
            assert b.ref_cnt == refs[b.block_id], f"block {b.block_id}: ref {b.ref_cnt} != {refs[b.block_id]}"
            assert (b.ref_cnt == 0) == (b.block_id in self.pool.free_queue), f"block {b.block_id} free-list state"
        used = sum(1 for r in refs if r)
        assert used + self.pool.num_free_blocks == self.pool.num_blocks
