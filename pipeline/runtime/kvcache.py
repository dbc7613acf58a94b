"""A paged KV cache with a fixed budget, and reuse of blocks across requests that share a prefix:
the CPU counterpart of TensorRT-LLM's KV cache manager.

Keys and values of every layer live in one preallocated pool of ``num_blocks`` blocks of
``block_size`` positions (the engine's ``tokens_per_block``). The pool is allocated once with
``torch.empty``: pages the operating system has not handed out yet cost nothing, and the process
never holds more than the pool however the load grows.

A block that is full is named by a hash of its tokens and of every token before it, so two
requests with the same prefix name the same blocks. When its last user finishes, a named block is
kept as it is (evictable, least recently used first) and handed to the next request whose prompt
starts the same way; a block is only overwritten when no unnamed free block is left.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

ROOT = b"kv"


def prefix_root(adapter: str | None) -> bytes:
    """Where a sequence's block names start: keys and values computed under a LoRA adapter differ
    from the base model's, so a prefix is shared only among requests with the same adapter."""
    if adapter is None:
        return ROOT
    return hashlib.blake2b(ROOT + b"|lora|" + adapter.encode(), digest_size=16).digest()


def block_hashes(tokens: list[int], block_size: int, parent: bytes = ROOT) -> list[bytes]:
    """The name of each full block of ``tokens``: a hash chained over every token up to its end."""
    names = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        chunk = ",".join(map(str, tokens[start : start + block_size])).encode()
        parent = hashlib.blake2b(parent + b"|" + chunk, digest_size=16).digest()
        names.append(parent)
    return names


@dataclass
class BlockTable:
    """The blocks one sequence holds, in position order, and what its allocations cost."""

    blocks: list[int] = field(default_factory=list)
    named: int = 0  # leading blocks whose name is known
    chain: bytes = ROOT  # the name of the last of them
    reused: int = 0  # blocks found in the cache at admission
    allocated: int = 0  # blocks taken from the free pool

    def slots(self, start: int, stop: int, block_size: int) -> torch.Tensor:
        """Flat pool indices of positions start..stop-1."""
        positions = torch.arange(start, stop)
        table = torch.tensor(self.blocks, dtype=torch.long)
        return table[positions // block_size] * block_size + positions % block_size


class KVCache:
    """Not thread-safe: the scheduler's thread alone uses it."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        reuse: bool = True,
    ):
        self.block_size, self.num_blocks, self.reuse = block_size, num_blocks, reuse
        # one extra block, never handed out, pads gathers. Attention masks padded and unwritten
        # positions, but a masked NaN still poisons the sum (0 x NaN), and torch.empty memory can
        # hold any bits: so the padding block and every block handed out are zeroed first.
        shape = (layers, (num_blocks + 1) * block_size, kv_heads, head_dim)
        self.keys = torch.empty(shape, dtype=dtype)
        self.values = torch.empty(shape, dtype=dtype)
        self.padding_block = num_blocks
        self._zero(self.padding_block)
        self.refs = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # unnamed, never handed out yet first
        # blocks written at least once (the part of the pool resident in host memory). Never used
        # blocks leave ``free`` lowest first, so those written are always 0..resident_blocks-1
        self.resident_blocks = 0
        self.evictable: OrderedDict[int, None] = OrderedDict()  # named blocks nobody holds, oldest first
        self.by_name: dict[bytes, int] = {}
        self.name_of: dict[int, bytes] = {}

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32) -> int:
        return 2 * layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def available(self) -> int:
        """Blocks that can be handed out now: free ones and named ones nobody holds."""
        return len(self.free) + len(self.evictable)

    @property
    def resident_bytes(self) -> int:
        """Host memory the pool's written blocks hold (the rest of the pool is not touched yet)."""
        per_block = (self.keys.nbytes + self.values.nbytes) // (self.num_blocks + 1)
        return self.resident_blocks * per_block

    @property
    def used(self) -> int:
        return self.num_blocks - self.available

    def cached_prefix(self, tokens: list[int], root: bytes = ROOT) -> list[int]:
        """The blocks already holding a prefix of ``tokens`` (computed from ``root``: see
        ``prefix_root``). The last token is never matched: its logits are needed, so at least one
        position is always computed."""
        if not self.reuse:
            return []
        found = []
        for name in block_hashes(tokens[: len(tokens) - 1], self.block_size, root):
            block = self.by_name.get(name)
            if block is None:
                break
            found.append(block)
        return found

    def share(self, table: BlockTable, blocks: list[int]) -> None:
        """Start ``table`` with cached ``blocks`` (from ``cached_prefix``)."""
        for block in blocks:
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
        table.blocks.extend(blocks)
        table.named = table.reused = len(blocks)
        if blocks:
            table.chain = self.name_of[blocks[-1]]

    def grow(self, table: BlockTable, positions: int) -> bool:
        """Give ``table`` enough blocks for ``positions`` positions; False (and nothing taken) when
        the pool cannot."""
        missing = self.blocks_for(positions) - len(table.blocks)
        if missing > self.available:
            return False
        for _ in range(missing):
            table.blocks.append(self._take())
        table.allocated += max(missing, 0)
        return True

    def _take(self) -> int:
        if self.free:
            block = self.free.pop()
        else:  # overwrite the least recently used named block
            block, _ = self.evictable.popitem(last=False)
            del self.by_name[self.name_of.pop(block)]
        self.refs[block] = 1
        self._zero(block)
        self.resident_blocks = max(self.resident_blocks, block + 1)
        return block

    def _zero(self, block: int) -> None:
        positions = slice(block * self.block_size, (block + 1) * self.block_size)
        self.keys[:, positions] = 0
        self.values[:, positions] = 0

    def name_full_blocks(self, table: BlockTable, tokens: list[int], computed: int) -> None:
        """Register the blocks whose positions are all computed, so later requests can reuse them."""
        if not self.reuse:
            return
        full = computed // self.block_size
        if full <= table.named:
            return
        start = table.named * self.block_size
        names = block_hashes(tokens[start : full * self.block_size], self.block_size, table.chain)
        for index, name in zip(range(table.named, full), names, strict=True):
            block = table.blocks[index]
            # the same content computed twice at once (two identical prompts): the first copy is found
            if name not in self.by_name and block not in self.name_of:
                self.by_name[name] = block
                self.name_of[block] = name
        table.named, table.chain = full, names[-1]

    def release(self, table: BlockTable) -> None:
        """The sequence is done: its blocks go back, named ones kept for reuse (last used last)."""
        # deepest first, so that of one prefix the deepest block is evicted first (its parents
        # stay findable)
        for block in reversed(table.blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.name_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
        table.blocks = []


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _read_number(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def cgroup_available_bytes(root: str = "/sys/fs/cgroup") -> int | None:
    """What the container's memory limit still allows (cgroup v2 memory.max - memory.current, or
    v1's limit_in_bytes - usage_in_bytes), or None without a limit: a pod limited to 4 GiB on a
    64 GiB node is OOM-killed if its pool is sized from the node's free memory."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        limit = _read_number(f"{root}/{limit_file}")
        if limit is not None and limit < 2**60:  # v1 writes a huge number for "no limit"
            return max(0, limit - (_read_number(f"{root}/{usage_file}") or 0))
    return None


def available_memory_bytes(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Memory this process can still get, the CPU's "free GPU memory": the host's MemAvailable,
    or less where a cgroup limit (a container's) allows less."""
    host = _host_available_bytes()
    limited = cgroup_available_bytes(cgroup_root)
    return host if limited is None else min(host, limited)


def budget_tokens(bytes_per_token: int, memory_fraction: float, max_tokens: int | None, ceiling: int) -> int:
    """The KV cache size in tokens, as the TensorRT-LLM backend sizes it: ``memory_fraction`` of the
    memory free once the weights are loaded (kv_cache_free_gpu_mem_fraction), capped by
    ``max_tokens`` (max_tokens_in_paged_kv_cache) when set, and by ``ceiling`` (what a full batch of
    the longest sequences can use: more would never be touched)."""
    by_memory = int(memory_fraction * available_memory_bytes()) // bytes_per_token
    return min(by_memory, max_tokens or ceiling, ceiling)
