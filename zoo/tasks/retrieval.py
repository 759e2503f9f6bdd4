"""Retrieval and zero-shot metrics of dual encoders: recall@K both ways, its chance level, and the zero-shot
class embeddings (CLIP prompt ensembling)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

def retrieval_recall(similarity: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways from ``similarity [N_images, N_texts]`` and each text's image ``text_to_image
    [N_texts]``. image->text: an image is a hit when ANY of its texts is among its K most similar texts;
    text->image: a text is a hit when its image is among its K most similar images. Ties count against
    (strictly-greater scores rank ahead). Returns ``{"i2t_R@K": r, "t2i_R@K": r}``, fractions in [0, 1] (the unit
    of every logged metric)."""
    n_img, n_txt = similarity.shape
    sim = similarity.float()
    owner = text_to_image.long()
    # text -> image: rank of the true image = number of images scoring strictly higher.
    true_t2i = sim[owner, torch.arange(n_txt)]  # [N_txt]
    rank_t2i = (sim > true_t2i.unsqueeze(0)).sum(0)  # [N_txt]
    # image -> text: best rank among the image's own texts.
    is_own = owner.unsqueeze(0) == torch.arange(n_img).unsqueeze(1)  # [N_img, N_txt]
    best_own = torch.where(is_own, sim, torch.full_like(sim, -float("inf"))).max(1).values  # [N_img]
    rank_i2t = (sim > best_own.unsqueeze(1)).sum(1)
    has_text = is_own.any(1)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((rank_i2t[has_text] < k).float().mean()) if has_text.any() else float("nan")
        out[f"t2i_R@{k}"] = float((rank_t2i < k).float().mean()) if n_txt else float("nan")
    return out


def retrieval_chance(num_images: int, captions_per_image: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Expected recall@K (a fraction in [0, 1]) of a random ranking: t2i ``K / N_images``; i2t ``1 - C(T - c, K) / C(T, K)``
    with T texts of which c belong to the image."""
    T, c = num_images * captions_per_image, captions_per_image
    out = {}
    for k in ks:
        miss = math.comb(T - c, k) / math.comb(T, k) if T - c >= k else 0.0
        out[f"i2t_R@{k}"] = 1 - miss
        out[f"t2i_R@{k}"] = min(1.0, k / num_images)
    return out


@torch.no_grad()
def zero_shot_classifier(model: nn.Module, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                         batch_size: int = 256) -> Tensor:
    """``[C, D]`` class embeddings: the normalised mean over ``templates`` of the normalised prompt
    embeddings ``model.encode_text(tokenizer(template.format(class)))`` (CLIP prompt ensembling)."""
    prompts = [t.format(c) for c in class_names for t in templates]
    tokens = tokenizer(prompts).to(next(model.parameters()).device)
    embeds = torch.cat([model(text=chunk).text_embeds for chunk in tokens.split(batch_size)])
    embeds = embeds.reshape(len(class_names), len(templates), -1).mean(1)
    return F.normalize(embeds, dim=-1)


