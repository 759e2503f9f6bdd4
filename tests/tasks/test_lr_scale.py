"""Per-group learning rates (``lr_scale``, the shared optimiser group): a named freeze group trains at ``factor * lr``
through warmup and decay, every other parameter at ``lr``; an unknown group is an error."""

import pytest
import torch

from zoo.tasks.instruct import InstructTask


def _task(**kw):
    return InstructTask("moe_llava_tiny", lr=1e-3, warmup_steps=2, total_steps=10, weight_decay=0.1, **kw)


def _lrs_by_param(opt):
    return {name: g["lr"] for g in opt.param_groups for name in g["names"]}


def test_a_scaled_group_follows_the_schedule_at_its_factor():
    task = _task(trainable=["vision_tower", "projector"], lr_scale={"vision_tower": 0.1})
    conf = task.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    tower = {n for n, _ in task.model.named_parameters() if n.startswith("vision_tower.")}
    for _ in range(4):  # through the warmup into the decay
        opt.step()
        sched.step()
        lrs = _lrs_by_param(opt)
        plain = {lr for n, lr in lrs.items() if n not in tower}
        scaled = {lr for n, lr in lrs.items() if n in tower}
        assert len(plain) == 1 and len(scaled) == 1
        assert scaled.pop() == pytest.approx(0.1 * plain.pop(), rel=1e-9)
    assert set(_lrs_by_param(opt)) == {n for n, p in task.model.named_parameters() if p.requires_grad}
    # weight decay still follows the parameter kind inside the scaled group
    wd = {name: g["weight_decay"] for g in opt.param_groups for name in g["names"]}
    assert wd["vision_tower.patch_embed.proj.weight"] == 0.1 and wd[next(n for n in tower if n.endswith("bias"))] == 0.0


def test_without_lr_scale_the_groups_are_unchanged():
    conf = _task(trainable=["vision_tower", "projector"]).configure_optimizers()
    assert len(conf["optimizer"].param_groups) == 2 and all("lr_group" not in g for g in conf["optimizer"].param_groups)


def test_bad_lr_scale_is_refused():
    with pytest.raises(ValueError, match="not parameter groups of this model"):
        _task(lr_scale={"tower": 0.1}).configure_optimizers()
    with pytest.raises(ValueError, match="factors > 0"):
        _task(lr_scale={"vision_tower": 0.0})
