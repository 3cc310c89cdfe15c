"""Paged KV block accounting: a block pool with ref counts and prefix caching, and per-request block tables.

Each full block is keyed by a hash chained with its prefix's hash. The key only finds a candidate: a hit also
compares the block's tokens and the registration serial of its parent block, so neither a hash collision nor a
parent that was evicted and re-registered with other tokens can ever hand out wrong KV. A block is registered only
after the step that computed its tokens ran (`cache_computed`), so a hit never points at KV that is still pending or
that a preempted request never wrote. Blocks whose ref count drops to zero go to the back of the free queue but keep
their registration: a later request with the same prefix can reuse them until they are evicted (the front of the
free queue is taken first, so the least recently freed block goes first).

With a sliding window (every layer reads only a request's last `sliding_window` positions), the blocks wholly
before the window of a request's next token are freed as it advances (vLLM's sliding-window manager), so a
request holds about window / block_size + 1 blocks however long it runs. The block table keeps their positions
(entries become `None` here; the runner keeps the old ids, which the attention kernels never read because every
query's window starts after them). Prefix caching stays correct: a hit is still found as a chain from the first
block (each block's parent is checked), but only the hit blocks inside the window of the first token to compute are
taken (vLLM's rule: the blocks a new token can see must be present); a block freed before it was registered ends
the request's hash chain.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from weavelm.utils import cdiv
from weavelm.core.multimodal import block_mm_keys
from weavelm.core.request import Request

NONE_HASH = 0
ROOT_SERIAL = 0  # the "parent" of every request's first block


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "serial", "parent_serial", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None  # key in the prefix table while registered
        self.serial = 0  # unique per registration; 0 while unregistered
        self.parent_serial = 0
        self.token_ids: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


@dataclass(frozen=True)
class KVCacheStats:
    """Counts of a KV pool: blocks in total, held by requests, holding registered prefixes (free or not)."""

    num_total_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    usage: float
    prefix_hit_rate: float


def root_hash(request: Request) -> int:
    """The chain's seed: requests on different LoRA adapters never share KV blocks."""
    lora = request.lora_request
    return NONE_HASH if lora is None else hash(("lora", lora.lora_int_id))


def hash_block(parent_hash: int, token_ids: tuple[int, ...], mm_keys: tuple[str, ...] = ()) -> int:
    """A full block's key; `mm_keys`: content hashes of the multimodal items its tokens cover (placeholder tokens
    are equal for every image, so the image content must join the key)."""
    return hash((parent_hash, token_ids, mm_keys)) if mm_keys else hash((parent_hash, token_ids))


class BlockPool:
    """All blocks, the free queue (LRU order) and the prefix table (chained hash -> registered block)."""

    def __init__(self, num_blocks: int, enable_caching: bool):
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, KVCacheBlock] = {}
        self._serials = itertools.count(ROOT_SERIAL + 1)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def lookup(self, block_hash: int, parent_serial: int, token_ids: tuple[int, ...]) -> KVCacheBlock | None:
        block = self.cached.get(block_hash)
        if block is None or block.parent_serial != parent_serial or block.token_ids != token_ids:
            return None
        return block

    def take(self, n: int) -> list[KVCacheBlock]:
        """Allocate `n` blocks from the front of the free queue, evicting their registrations."""
        assert n <= len(self.free_queue), "caller must check can_allocate first"
        out = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
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

    def register(self, block: KVCacheBlock, block_hash: int, parent_serial: int,
                 token_ids: tuple[int, ...]) -> int | None:
        """Enter a computed full block in the prefix table.

        Returns the serial that identifies this content for the next block's chain: the block's own, or that of
        an already registered block holding the same prefix; None when the key is taken by different content
        (a hash collision), which ends the chain.
        """
        existing = self.cached.get(block_hash)
        if existing is not None:
            if existing.parent_serial == parent_serial and existing.token_ids == token_ids:
                return existing.serial
            return None
        assert block.block_hash is None, f"block {block.block_id} is registered twice"
        block.block_hash, block.parent_serial, block.token_ids = block_hash, parent_serial, token_ids
        block.serial = next(self._serials)
        self.cached[block_hash] = block
        return block.serial

    def _evict(self, block: KVCacheBlock) -> None:
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        block.block_hash = block.token_ids = None
        block.serial = block.parent_serial = 0

    def num_cached_blocks(self) -> int:
        return len(self.cached)


@dataclass
class ComputedBlocks:
    """Prefix-cache hits for a request: blocks to share and the number of tokens they hold."""

    blocks: list[KVCacheBlock]
    num_tokens: int

    @property
    def tail_serial(self) -> int:
        return self.blocks[-1].serial if self.blocks else ROOT_SERIAL


NO_HITS = ComputedBlocks([], 0)


class KVCacheManager:
    """Per-request block tables on top of a BlockPool. Used by schedulers; knows no policy.

    Per request: `req_blocks[id]` (its block table; `None` for a block freed because it left the sliding window),
    `num_hashed[id]` (leading blocks already registered or matched), `chain_serial[id]` (serial of the registered
    content of its last hashed block; None once broken) and `num_skipped[id]` (leading blocks freed by the window).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.num_skipped: dict[str, int] = {}
        self.req_blocks: dict[str, list[KVCacheBlock | None]] = {}
        self.num_hashed: dict[str, int] = {}
        self.chain_serial: dict[str, int | None] = {}
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
        """Share of the tokens of admitted requests that were found in the prefix cache."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def stats(self) -> KVCacheStats:
        """Pool counts as a result object (the pool itself stays private)."""
        total, free = self.pool.num_blocks, self.pool.num_free_blocks
        return KVCacheStats(total, total - free, self.pool.num_cached_blocks(), self.usage, self.prefix_hit_rate)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` KV entries."""
        return cdiv(num_tokens, self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        """The ids of the blocks the request holds (not the positions freed by the sliding window)."""
        return [b.block_id for b in self.req_blocks.get(request_id, ()) if b is not None]

    def num_outside_window(self, request: Request, computed: ComputedBlocks | None) -> int:
        """How many of a new request's leading prefix hits no token it computes can see (they are not taken)."""
        if self.sliding_window is None or not computed or not computed.blocks:
            return 0
        first_query = request.num_computed_tokens + computed.num_tokens
        return min(len(computed.blocks), max(0, first_query - self.sliding_window + 1) // self.block_size)

    def remove_skipped_blocks(self, request: Request) -> None:
        """Free the request's blocks that no token from `request.num_computed_tokens` on can see: those wholly
        before `num_computed_tokens - sliding_window + 1` (the first key of its next token's window)."""
        rid = request.request_id
        table = self.req_blocks.get(rid)
        if self.sliding_window is None or not table:
            return
        first_needed = max(0, request.num_computed_tokens - self.sliding_window + 1) // self.block_size
        done = self.num_skipped.get(rid, 0)
        if first_needed <= done:
            return
        freed = [b for b in table[done:first_needed] if b is not None]
        table[done:first_needed] = [None] * (first_needed - done)
        self.num_skipped[rid] = first_needed
        self.pool.free(freed)

    def _update_hashes(self, request: Request) -> None:
        tokens, bs = request.all_token_ids, self.block_size
        hashes, mm = request.block_hashes, request.mm_features
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            parent = hashes[-1] if hashes else root_hash(request)
            block = tuple(tokens[i * bs:(i + 1) * bs])
            keys = block_mm_keys(mm, i * bs, (i + 1) * bs) if mm else ()
            hashes.append(hash_block(parent, block, keys) if keys else hash_block(parent, block))

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """Longest cached prefix of a request without blocks, leaving at least one token to compute."""
        if not self.enable_caching or request.sampling_params.skip_reading_prefix_cache:
            return NO_HITS
        self._update_hashes(request)
        bs, tokens = self.block_size, request.all_token_ids
        hits: list[KVCacheBlock] = []
        serial = ROOT_SERIAL
        for i in range((request.num_tokens - 1) // bs):
            block = self.pool.lookup(request.block_hashes[i], serial, tuple(tokens[i * bs:(i + 1) * bs]))
            if block is None:
                break
            hits.append(block)
            serial = block.serial
        return ComputedBlocks(hits, len(hits) * bs) if hits else NO_HITS

    def blocks_needed(self, request: Request, num_new_tokens: int, computed: ComputedBlocks | None = None) -> int:
        """Free blocks that `allocate_slots(request, num_new_tokens, computed)` would take."""
        table = self.req_blocks.get(request.request_id)
        have = len(table) if table else 0
        num_tokens = request.num_computed_tokens + num_new_tokens
        revived = 0
        if computed is not None and computed.blocks:
            num_tokens += computed.num_tokens
            have += len(computed.blocks)
            # reviving unreferenced cache hits takes them out of the free queue too (not those outside the window)
            skip = self.num_outside_window(request, computed)
            revived = sum(1 for b in computed.blocks[skip:] if b.ref_cnt == 0)
        return max(self.blocks_for_tokens(num_tokens) - have, 0) + revived

    def can_allocate(self, request: Request, num_new_tokens: int, computed: ComputedBlocks | None = None) -> bool:
        return self.blocks_needed(request, num_new_tokens, computed) <= self.pool.num_free_blocks

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed: ComputedBlocks | None = None) -> list[int] | None:
        """Reserve blocks so the request's KV covers its computed tokens (plus `computed` hits, for a request
        without blocks) and `num_new_tokens` more.

        Returns the ids of the blocks added to its table (cache hits first), or None when they do not fit (then
        nothing changed but the release of blocks that left the sliding window, `remove_skipped_blocks`).
        """
        rid = request.request_id
        table = self.req_blocks.get(rid)
        if table is not None and self.sliding_window is not None:
            self.remove_skipped_blocks(request)
        if table is not None and not (computed and computed.blocks):
            # the hot path: a running request, usually a decode that fits in its last block
            total = self.blocks_for_tokens(request.num_computed_tokens + num_new_tokens)
            extra = total - len(table)
            if extra <= 0:
                return []
            if extra > self.pool.num_free_blocks:
                return None
            fresh = self.pool.take(extra)
            table.extend(fresh)
            return [b.block_id for b in fresh]
        if not self.can_allocate(request, num_new_tokens, computed):
            return None
        assert not table, "prefix hits are only taken for a request without blocks"
        table = self.req_blocks[rid] = []
        hits = computed.blocks if computed else []
        skip = self.num_outside_window(request, computed)
        ids = [b.block_id for b in hits]  # the runner gets every position's id; it never reads the skipped ones
        if hits:
            self.pool.touch(hits[skip:])
            table.extend([None] * skip + hits[skip:])
        if skip:
            self.num_skipped[rid] = skip
        self.num_hashed[rid] = len(hits)
        self.chain_serial[rid] = computed.tail_serial if computed else ROOT_SERIAL
        if self.enable_caching:
            self.prefix_queries += request.num_tokens
            self.prefix_hits += len(hits) * self.block_size
        total = self.blocks_for_tokens(request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens)
        if total > len(table):
            fresh = self.pool.take(total - len(table))
            table.extend(fresh)
            ids += [b.block_id for b in fresh]
        return ids

    def cache_computed(self, request: Request) -> None:
        """Register the request's full blocks whose KV has been computed (`request.num_computed_tokens`).

        The scheduler calls this after the step that computed them ran, never earlier.
        """
        if not self.enable_caching:
            return
        rid = request.request_id
        start = self.num_hashed.get(rid)
        num_full = request.num_computed_tokens // self.block_size  # computed tokens never exceed the known ones
        if start is None or num_full <= start:
            return
        serial = self.chain_serial[rid]
        if serial is None:
            return
        self._update_hashes(request)
        bs, table, tokens, hashes = self.block_size, self.req_blocks[rid], request.all_token_ids, request.block_hashes
        for i in range(start, num_full):
            if table[i] is None:  # freed by the sliding window before it was registered: the chain ends here
                serial = None
                break
            serial = self.pool.register(table[i], hashes[i], serial, tuple(tokens[i * bs:(i + 1) * bs]))
            if serial is None:
                break
        self.num_hashed[rid] = num_full
        self.chain_serial[rid] = serial

    def free_tail(self, request: Request, num_kept_blocks: int) -> None:
        """Release the blocks of the request's table past its first `num_kept_blocks` (speculative decoding's
        rollback: they held only rejected drafts or lookahead slots, never a registered block)."""
        table = self.req_blocks.get(request.request_id)
        if not table or len(table) <= num_kept_blocks:
            return
        tail = table[num_kept_blocks:]
        del table[num_kept_blocks:]
        assert len(table) >= self.num_hashed.get(request.request_id, 0), "a hashed block cannot be in the tail"
        self.pool.free([b for b in reversed(tail) if b is not None])

    def free(self, request: Request) -> None:
        """Release every block of the request; tail blocks are evicted before the shared prefix."""
        rid = request.request_id
        blocks = self.req_blocks.pop(rid, None)
        self.num_hashed.pop(rid, None)
        self.chain_serial.pop(rid, None)
        self.num_skipped.pop(rid, None)
        if blocks:
            blocks = [b for b in reversed(blocks) if b is not None]
            self.pool.free(blocks)

    def reset_prefix_cache(self) -> int:
        """Forget every registered block that no request holds (vLLM's `reset_prefix_cache`; benchmarks use it so a
        rerun of the same prompts finds no hits). Returns the number of blocks forgotten."""
        pool = self.pool
        idle = [pool.blocks[i] for i in pool.free_queue if pool.blocks[i].block_hash is not None]
        for block in idle:
            pool._evict(block)
        return len(idle)

    def check_invariants(self) -> None:
        """Ref counts equal table membership; the free queue holds exactly the unreferenced blocks; the prefix
        table is consistent (tests)."""
        pool = self.pool
        refs = [0] * pool.num_blocks
        for rid, table in self.req_blocks.items():
            skipped = self.num_skipped.get(rid, 0)
            assert all(b is None for b in table[:skipped]), "a block the window freed is still held"
            held = [b for b in table if b is not None]
            assert len(held) == len(table) - skipped, "only leading blocks are freed by the window"
            assert len({b.block_id for b in held}) == len(held), "a block appears twice in one table"
            for b in held:
                refs[b.block_id] += 1
        for b in pool.blocks:
            assert b.ref_cnt == refs[b.block_id], f"block {b.block_id}: ref {b.ref_cnt} != {refs[b.block_id]}"
            assert (b.ref_cnt == 0) == (b.block_id in pool.free_queue), f"block {b.block_id} free-list state"
        for h, b in pool.cached.items():
            assert b.block_hash == h and b.serial > ROOT_SERIAL and len(b.token_ids) == self.block_size
        assert sum(1 for b in pool.blocks if b.block_hash is not None) == len(pool.cached)
        used = sum(1 for r in refs if r)
        assert used + pool.num_free_blocks == pool.num_blocks
        assert set(self.num_hashed) == set(self.chain_serial) == set(self.req_blocks)
