"""The resumable training order with several processes: each rank's share, the padding, resuming part-way, and
that Lightning keeps the sampler as it is (tests/tasks/test_resume.py runs a 2-process kill-free resume end to end)."""

from __future__ import annotations

from torch.utils.data import DistributedSampler

from zoo.data.sampling import ResumableShuffleSampler, ShardedResumableShuffleSampler


def _epoch(sampler):
    return [(int(i), i.seed) for i in sampler]


def test_ranks_share_one_padded_epoch_with_the_single_process_seeds():
    single = ResumableShuffleSampler(7, seed=3)
    ranks = [ShardedResumableShuffleSampler(7, 3, num_replicas=2, rank=r) for r in range(2)]
    whole = _epoch(single)
    shares = [_epoch(s) for s in ranks]
    assert [len(s) for s in ranks] == [4, 4] and [len(x) for x in shares] == [4, 4]
    # positions r, r + 2, ...: the single process's order, padded with its first sample (7 -> 8)
    padded_indices = [i for i, _ in whole] + [whole[0][0]]
    assert [i for i, _ in shares[0]] == padded_indices[0::2] and [i for i, _ in shares[1]] == padded_indices[1::2]
    # a sample's augmentation seed is its position's, as in one process
    assert [s for _, s in shares[0][:3]] == [whole[p][1] for p in (0, 2, 4)]
    assert sorted(i for share in shares for i, _ in share[:4]) == sorted(padded_indices)


def test_resuming_part_way_skips_what_every_rank_trained():
    ranks = [ShardedResumableShuffleSampler(10, 0, num_replicas=2, rank=r) for r in range(2)]
    full = [_epoch(ShardedResumableShuffleSampler(10, 0, num_replicas=2, rank=r)) for r in range(2)]
    for s in ranks:
        s.resume_at(0, 4)  # 2 batches of 1 on each of the 2 ranks
    assert [_epoch(s) for s in ranks] == [full[0][2:], full[1][2:]]
    assert [len(s) for s in ranks] == [5, 5]  # len stays the whole epoch's share (the loop counts from the start)
    assert all(s.epoch == 0 for s in ranks)
    assert [_epoch(s)[0] for s in ranks] != [full[0][0], full[1][0]]  # the next iter() is epoch 1, a new order


def test_lightning_keeps_it_and_its_epoch():
    s = ShardedResumableShuffleSampler(10, 0, num_replicas=2, rank=1)
    assert isinstance(s, DistributedSampler)  # Lightning wraps any other sampler (and indexes past a resumed epoch)
    list(s)
    s.set_epoch(7)  # Lightning calls it at every epoch start; the sampler's own (checkpointed) epoch stays
    assert s.epoch == 0
    one = ResumableShuffleSampler(10, 0)
    assert len(one) == 10 and one.total == 10 and not isinstance(one, DistributedSampler)


def test_a_datamodule_set_up_before_a_multi_process_trainer_shards_its_order_and_keeps_the_resume_position():
    """The CLI sets a datamodule up before fit (to read its vocabulary), when no trainer is attached yet: the train
    loader then makes the sampler this process's share, at the resume position a checkpoint already gave."""
    from types import SimpleNamespace

    from zoo.data.image_classification import DigitsDataModule

    dm = DigitsDataModule(batch_size=16)
    dm.setup("fit")  # no trainer: one process
    assert type(dm._train_sampler) is ResumableShuffleSampler
    dm.load_state_dict({"train_order": {"epoch": 1, "batches_done": 3, "batch_size": 16, "world_size": 2,
                                        "epoch_finished": False, "seed": 0}})
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1}))
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, ShardedResumableShuffleSampler) and (sampler.num_replicas, sampler.rank) == (2, 1)
    reference = ShardedResumableShuffleSampler(sampler.size, 0, num_replicas=2, rank=1)
    reference.resume_at(1, 3 * 16 * 2)  # 3 batches of 16 on each of 2 processes
    assert _epoch(sampler) == _epoch(reference) and sampler.epoch == 1
