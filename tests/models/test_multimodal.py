"""splice_media against a per-sample reference written the plain way (drop padding, replace each placeholder by its
item, truncate, pad), and its host-read contract: media given as callables are encoded after the ids are read."""
import pytest
import torch

from zoo.models.multimodal import (AUDIO, AUDIO_TOKEN_ID, IGNORE_INDEX, IMAGE, IMAGE_TOKEN_ID, TEXT,
                                   splice_media)

D = 4


def reference(ids, mask, labels, embed, items, max_length, padding_side):
    """One sample at a time, token by token. ``items[pid][b]``: that sample's items in order, each [N, D]."""
    B, L = ids.shape
    seqs = []
    for b in range(B):
        rows, labs, mods, first = [], [], [], [-1] * L
        left = {pid: list(per_sample[b]) for pid, per_sample in items.items()}
        for i in range(L):
            if not mask[b, i]:
                continue
            t = int(ids[b, i])
            if t >= 0:
                first[i] = len(rows)
                rows.append(embed(ids[b, i:i + 1])[0])
                labs.append(int(labels[b, i]))
                mods.append(TEXT)
            else:
                item = left[t].pop(0)
                if item.shape[0]:
                    first[i] = len(rows)
                rows.extend(item)
                labs.extend([IGNORE_INDEX] * item.shape[0])
                mods.extend([IMAGE if t == IMAGE_TOKEN_ID else AUDIO] * item.shape[0])
        n = len(rows) if max_length is None else min(len(rows), max_length)
        first = [f if f < n else -1 for f in first]
        seqs.append((rows[:n], labs[:n], mods[:n], first))
    S = max(len(s[0]) for s in seqs)
    emb = torch.zeros(B, S, D)
    lab = torch.full((B, S), IGNORE_INDEX)
    mod = torch.zeros(B, S, dtype=torch.long)
    real = torch.zeros(B, S, dtype=torch.bool)
    pos = torch.zeros(B, S, dtype=torch.long)
    where = torch.full((B, L), -1)
    for b, (rows, labs, mods, first) in enumerate(seqs):
        n = len(rows)
        at = S - n if padding_side == "left" else 0
        if n:
            emb[b, at:at + n] = torch.stack(rows)
        lab[b, at:at + n] = torch.tensor(labs, dtype=torch.long)
        mod[b, at:at + n] = torch.tensor(mods, dtype=torch.long)
        real[b, at:at + n] = True
        pos[b, at:at + n] = torch.arange(n)
        where[b] = torch.tensor([f + at if f >= 0 else -1 for f in first])
    return emb, lab, mod, real, pos, where, real.sum(1)


def batch():
    """Three samples: left padding, two images + audio chunks, a text-only sample with an (unused) image."""
    g = torch.Generator().manual_seed(0)
    I, A = IMAGE_TOKEN_ID, AUDIO_TOKEN_ID
    ids = torch.tensor([[999, 999, 5, I, 6, 7, 8, 9, 10],      # two pad tokens (ids out of the vocabulary) on the left
                        [1, I, 2, A, 3, I, 4, 5, 6],
                        [7, 8, 9, 10, 11, 12, 0, 0, 0]])       # right padding, no placeholder
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    labels = torch.randint(0, 20, ids.shape, generator=g)
    images = [torch.randn(3, D, generator=g), [torch.randn(2, D, generator=g), torch.randn(4, D, generator=g)],
              torch.randn(3, D, generator=g)]
    audio = [None, torch.randn(2, 2, D, generator=g), None]  # one item of 2 chunks x 2 tokens
    return ids, mask, labels, images, audio


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("max_length", [None, 10, 9, 4])  # 10 cuts sample 1 inside its second image, 9 before it
def test_splice_matches_the_per_sample_reference(padding_side, max_length):
    ids, mask, labels, images, audio = batch()
    table = torch.randn(20, D)
    embed = torch.nn.Embedding.from_pretrained(table)
    out = splice_media(ids, embed, {IMAGE_TOKEN_ID: images, AUDIO_TOKEN_ID: audio}, mask, labels,
                       max_length=max_length, padding_side=padding_side)
    items = {IMAGE_TOKEN_ID: [[images[0]], images[1], []],  # sample 2 has no placeholder: its image is not used
             AUDIO_TOKEN_ID: [[], [audio[1].reshape(-1, D)], []]}
    emb, lab, mod, real, pos, where, lengths = reference(ids, mask, labels, embed, items, max_length, padding_side)
    torch.testing.assert_close(out.inputs_embeds, emb, rtol=0, atol=0)
    assert torch.equal(out.labels, lab)
    assert torch.equal(out.modality, mod)
    assert torch.equal(out.attention_mask, real)
    assert torch.equal(out.position_ids, pos)
    assert torch.equal(out.token_positions, where)
    assert torch.equal(out.lengths, lengths)


def test_media_gradients_reach_the_kept_tokens_only_and_unused_items_stay_in_the_graph():
    ids, mask, labels, images, audio = batch()
    images = [x.requires_grad_() if isinstance(x, torch.Tensor) else [y.requires_grad_() for y in x]
              for x in images]
    out = splice_media(ids, torch.nn.Embedding(20, D), {IMAGE_TOKEN_ID: images, AUDIO_TOKEN_ID: audio}, mask,
                       max_length=10)
    out.inputs_embeds.sum().backward()
    assert torch.equal(images[0].grad, torch.ones(3, D))
    assert torch.equal(images[1][0].grad, torch.ones(2, D))
    # sample 1 = 1, image(2), 2, audio(4), 3, image(4), ...: 10 tokens keep one row of its second image
    assert torch.equal(images[1][1].grad, torch.tensor([[1.0] * D] + [[0.0] * D] * 3))
    assert torch.equal(images[2].grad, torch.zeros(3, D))  # unused: a zero gradient, not None


def test_media_given_as_callables_are_encoded_once_with_the_same_result():
    ids, mask, labels, images, audio = batch()
    embed = torch.nn.Embedding(20, D)
    calls = []

    def encode():
        calls.append(1)
        return images

    eager = splice_media(ids, embed, {IMAGE_TOKEN_ID: images, AUDIO_TOKEN_ID: audio}, mask, labels)
    lazy = splice_media(ids, embed, {IMAGE_TOKEN_ID: encode, AUDIO_TOKEN_ID: lambda: audio}, mask, labels)
    assert calls == [1]
    for name in ("inputs_embeds", "labels", "modality", "attention_mask", "position_ids", "token_positions"):
        assert torch.equal(getattr(eager, name), getattr(lazy, name)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host read only waits on a GPU")
def test_no_sync_after_the_host_read_so_the_encoder_runs_while_the_host_splices():
    """The media callable queues 200 ms of GPU work; splice_media must return with it still queued: any sync after
    the host read (a blocking copy, a boolean index, .item()) would wait for it."""
    ids, mask, labels, images, audio = batch()
    dev = torch.device("cuda")
    embed = torch.nn.Embedding(20, D).to(dev)
    images = [[y.to(dev) for y in x] if isinstance(x, list) else x.to(dev) for x in images]
    audio = [x if x is None else x.to(dev) for x in audio]
    ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
    torch.cuda.synchronize()

    def encode():
        torch.cuda._sleep(int(2e8))  # ~0.1-0.2 s of GPU clock cycles
        return images

    # The first call allocates the pinned host block of its index copy, and cudaHostAlloc synchronises (H200, session
    # 18); the caching host allocator serves every later call from that block.
    splice_media(ids, embed, {IMAGE_TOKEN_ID: images, AUDIO_TOKEN_ID: audio}, mask, labels, max_length=9)
    torch.cuda.synchronize()
    out = splice_media(ids, embed, {IMAGE_TOKEN_ID: encode, AUDIO_TOKEN_ID: audio}, mask, labels, max_length=9)
    assert not torch.cuda.current_stream().query(), "splice_media waited for the media's GPU work"
    cpu = splice_media(ids.cpu(), embed.cpu(), {IMAGE_TOKEN_ID: [[y.cpu() for y in x] if isinstance(x, list)
                                                                 else x.cpu() for x in images],
                                                AUDIO_TOKEN_ID: [x if x is None else x.cpu() for x in audio]},
                       mask.cpu(), labels.cpu(), max_length=9)
    torch.testing.assert_close(out.inputs_embeds.cpu(), cpu.inputs_embeds)
    assert torch.equal(out.labels.cpu(), cpu.labels) and torch.equal(out.modality.cpu(), cpu.modality)


def test_compiled_shifted_loss_gives_the_eager_loss_and_gradient():
    from zoo.models.multimodal import shifted_lm_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 33, generator=g).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 33, (2, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX
    eager = shifted_lm_loss(logits, labels)
    (eager_grad,) = torch.autograd.grad(eager, logits)
    compiled = shifted_lm_loss(logits, labels, compiled=True)
    (grad,) = torch.autograd.grad(compiled, logits)
    assert compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad)
