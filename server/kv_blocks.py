"""KV block bookkeeping: a pool of ref-counted blocks with prefix caching, and the per-request
block tables built on it. No tensors: the runner owns the memory, this owns the block ids.

Prefix caching: a full block is keyed by a hash chain over the token ids of every block up to
and including it; a block holding image slots also hashes the image's content (its slots are
all the same pad id). The same image and prompt prefix therefore map to the same blocks across
requests. Freed blocks keep their key and go to the end of an LRU free list; allocation takes
from the front and only then forgets the key. Every operation is O(1) per block.

NOTE: a cached block's K/V also depends on the expert each token used, which for the block's
last token depends on the next token's type. In a CogVLM sequence that is fixed by the block's
own content (a slot before eoi is followed by a slot, eoi and text by text), so the key above
is enough.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from model.batch import SequenceData


class BlockAccountingError(RuntimeError):
    """A double free or a free of a block nobody holds: a bug, never a user error."""


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set while the block is full, computed and findable by prefix


class BlockPool:
    def __init__(self, num_blocks: int):
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU: evict front
        self.cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self, count: int) -> list[int]:
        if count > len(self.free_blocks):
            raise BlockAccountingError(f"asked for {count} blocks with {len(self.free_blocks)} free")
        ids = []
        for _ in range(count):
            block_id, _ = self.free_blocks.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict its cached contents
                del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    def take(self, block_id: int) -> None:
        """A prefix-cache hit: one more holder; a free block leaves the free list."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def free(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise BlockAccountingError(f"block {block_id} freed with ref count {block.ref_count}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None

    def cache(self, block_id: int, block_hash: int) -> None:
        """Make a full, computed block findable. A second block with the same contents (two
        requests that computed the same prefix at once) stays uncached and is reused normally."""
        block = self.blocks[block_id]
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block_id


@dataclass
class RequestBlocks:
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks computed so far


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.requests: dict[str, RequestBlocks] = {}
        self.num_prefix_queries = 0  # tokens looked up, for the hit rate metric
        self.num_prefix_hits = 0  # tokens found

    def block_hash(self, seq: SequenceData, index: int, parent: int | None) -> int:
        start, end = index * self.block_size, (index + 1) * self.block_size
        extra = None
        slots = seq.prompt.image_slots
        if slots and start <= slots[-1] and end > slots[0]:
            extra = seq.prompt.image_hash
        return hash((parent, tuple(seq.token_ids(start, end)), extra))

    def computed_blocks(self, seq: SequenceData) -> list[int]:
        """Cached blocks that cover a prefix of the sequence. At least one token is always left to
        compute, so the step that finishes the prompt produces logits."""
        if not self.enable_prefix_caching:
            return []
        hits, parent = [], None
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for index in range(max_blocks):
            parent = self.block_hash(seq, index, parent)
            block_id = self.pool.lookup(parent)
            if block_id is None:
                break
            hits.append(block_id)
        self.num_prefix_queries += seq.num_tokens
        self.num_prefix_hits += len(hits) * self.block_size
        return hits

    def allocate(self, seq: SequenceData, num_tokens_after: int, hits: list[int] = ()) -> bool:
        """Grow the request's blocks to hold num_tokens_after tokens (taking the prefix hits
        first, for a request not yet holding blocks). False, with nothing changed, if the pool
        is short."""
        held = self.requests.get(seq.request_id)
        num_held = len(held.block_ids) if held else 0
        if not hits and num_tokens_after <= num_held * self.block_size:
            return True  # a decode inside its last block: 15 steps in 16
        num_needed = -(-num_tokens_after // self.block_size) - num_held - len(hits)
        hits_from_free = sum(1 for b in hits if self.pool.blocks[b].ref_count == 0)
        if num_needed + hits_from_free > self.pool.num_free:
            return False
        if held is None:
            held = self.requests[seq.request_id] = RequestBlocks()
        for block_id in hits:
            self.pool.take(block_id)
            held.block_hashes.append(self.pool.blocks[block_id].block_hash)
        held.block_ids += list(hits) + self.pool.allocate(max(num_needed, 0))
        return True

    def block_ids(self, request_id: str) -> list[int]:
        return self.requests[request_id].block_ids

    def cache_computed(self, seq: SequenceData, num_computed_tokens: int) -> None:
        """Key the blocks that became full and computed this step."""
        if not self.enable_prefix_caching:
            return
        held = self.requests[seq.request_id]
        for index in range(len(held.block_hashes), num_computed_tokens // self.block_size):
            parent = held.block_hashes[-1] if held.block_hashes else None
            block_hash = self.block_hash(seq, index, parent)
            held.block_hashes.append(block_hash)
            self.pool.cache(held.block_ids[index], block_hash)

    def free(self, request_id: str) -> None:
        held = self.requests.pop(request_id, None)
        if held is not None:
            # tail first, so the LRU evicts a prompt's tail before its (more shared) head
            self.pool.free(held.block_ids[::-1])

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / len(self.pool.blocks)
