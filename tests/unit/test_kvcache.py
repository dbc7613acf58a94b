"""The paged KV cache's bookkeeping (``pipeline.runtime.kvcache``): blocks handed out and given
back, prefixes found by name, the least recently used named block overwritten first."""

from __future__ import annotations

from pathlib import Path

from pipeline.runtime import kvcache
from pipeline.runtime.kvcache import BlockTable, KVCache, block_hashes, budget_tokens


def cache(blocks: int = 4, reuse: bool = True) -> KVCache:
    return KVCache(layers=1, kv_heads=1, head_dim=2, num_blocks=blocks, block_size=2, reuse=reuse)


def computed(pool: KVCache, tokens: list[int]) -> BlockTable:
    """A sequence whose ``tokens`` are all in the cache, its full blocks named."""
    table = BlockTable()
    pool.share(table, pool.cached_prefix(tokens))
    assert pool.grow(table, len(tokens))
    pool.name_full_blocks(table, tokens, len(tokens))
    return table


def test_a_block_is_named_by_everything_before_it() -> None:
    assert block_hashes([1, 2, 3, 4], 2)[0] == block_hashes([1, 2, 9, 9], 2)[0]
    assert block_hashes([1, 2, 3, 4], 2)[1] != block_hashes([0, 2, 3, 4], 2)[1]  # same block, other prefix
    assert len(block_hashes([1, 2, 3], 2)) == 1  # a partial block has no name


def test_a_shared_prefix_is_found_but_never_the_last_token() -> None:
    pool = cache()
    first = computed(pool, [1, 2, 3, 4, 5])
    assert pool.cached_prefix([1, 2, 3, 4, 7, 8]) == first.blocks[:2]
    assert pool.cached_prefix([1, 2, 3, 4]) == first.blocks[:1]  # its last token must be computed
    assert pool.cached_prefix([9, 2, 3, 4, 5]) == []
    assert cache(reuse=False).cached_prefix([1, 2, 3]) == []


def test_blocks_come_back_and_named_ones_stay_findable_until_overwritten() -> None:
    pool = cache(blocks=4)
    first = computed(pool, [1, 2, 3, 4, 5])  # 3 blocks, 2 named
    named = list(first.blocks[:2])
    pool.release(first)
    assert pool.available == 4 and pool.used == 0
    second = BlockTable()
    pool.share(second, pool.cached_prefix([1, 2, 3, 4, 6]))
    assert second.blocks == named and second.reused == 2 and pool.available == 2
    assert pool.grow(second, 6) and second.allocated == 1
    assert not pool.grow(second, 12)  # 6 blocks: more than the pool
    assert len(second.blocks) == 3  # nothing taken by the failed growth


def test_the_deepest_named_block_is_overwritten_first() -> None:
    pool = cache(blocks=3)
    pool.release(computed(pool, [1, 2, 3, 4, 5, 6]))  # 3 named blocks, now idle
    taker = BlockTable()
    assert pool.grow(taker, 2)  # no unnamed block left: one named block is overwritten
    assert pool.cached_prefix([1, 2, 3, 4, 5, 6, 7]) == pool.cached_prefix([1, 2, 3, 4, 9])[:2]
    assert len(pool.cached_prefix([1, 2, 3, 4, 5, 6, 7])) == 2  # the root and its child survive


def test_the_same_prompt_computed_twice_at_once_keeps_one_name_per_block() -> None:
    pool = cache(blocks=6)
    first, second = BlockTable(), BlockTable()
    for table in (first, second):  # both admitted before either named its blocks
        assert pool.grow(table, 5)
    for table in (first, second):
        pool.name_full_blocks(table, [1, 2, 3, 4, 5], 5)
    assert pool.cached_prefix([1, 2, 3, 4, 5]) == first.blocks[:2]
    pool.release(first)
    pool.release(second)
    assert pool.available == 6


def test_the_budget_is_the_smallest_of_memory_cap_and_ceiling() -> None:
    assert budget_tokens(1, 1.0, max_tokens=None, ceiling=4096) == 4096
    assert budget_tokens(1, 1.0, max_tokens=1000, ceiling=4096) == 1000
    assert budget_tokens(2**50, 0.5, max_tokens=None, ceiling=4096) == 0  # a petabyte per token fits nowhere


def test_the_pool_is_sized_from_a_containers_memory_limit_not_the_hosts(tmp_path: Path) -> None:

    (tmp_path / "memory.max").write_text(f"{4 * 2**30}\n")
    (tmp_path / "memory.current").write_text(f"{1 * 2**30}\n")
    assert kvcache.cgroup_available_bytes(str(tmp_path)) == 3 * 2**30
    assert kvcache.available_memory_bytes(str(tmp_path)) <= 3 * 2**30
    (tmp_path / "memory.max").write_text("max\n")  # no limit: the host's memory
    assert kvcache.cgroup_available_bytes(str(tmp_path)) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2 * 2**30}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{2**29}\n")
    assert kvcache.cgroup_available_bytes(str(v1)) == 2 * 2**30 - 2**29
