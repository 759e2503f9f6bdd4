"""Independent numpy / plain-python references for the MoE library tests.

Nothing here imports ``zoo``: routing, capacity, experts and losses are re-derived from the papers'
definitions (V-MoE, Riquelme et al. 2021; Switch; ST-MoE; LIMoE) with float64 numpy and python loops, so
the tests compare the library against a second implementation rather than against itself.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


# ------------------------------------------------------------------------------------------ capacity
def capacity(S: int, E: int, k: int, cf: float, multiple_of: int = 4) -> int:
    """``ceil(S * k * cf / E)`` in exact rational arithmetic (cf read as its decimal string), rounded up
    to ``multiple_of``."""
    c = math.ceil(Fraction(S * k) * Fraction(str(cf)) / E)
    if multiple_of > 1 and c % multiple_of:
        c += multiple_of - c % multiple_of
    return max(c, 1)


# ------------------------------------------------------------------------------------------- routing
def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def route_topk(probs, valid, k, cap=None, bpr=True, renormalize=False):
    """Token-choice top-k routing of one set of groups, V-MoE order.

    probs [G, S, E] (distinct values, no ties), valid [G, S] bool, cap = C or None (dropless).
    Returns expert_index [G,S,K] int, combine_weight [G,S,K] float, keep [G,S,K] bool, position [G,S,K]
    int (-1 where not kept): tokens are taken in descending top-1 probability (BPR) or token order, every
    token's 1st choice is placed before any 2nd choice, and a slot whose place is >= C is dropped.
    """
    probs = np.asarray(probs, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    G, S, E = probs.shape
    idx = np.zeros((G, S, k), dtype=np.int64)
    w = np.zeros((G, S, k))
    keep = np.zeros((G, S, k), dtype=bool)
    pos = -np.ones((G, S, k), dtype=np.int64)
    for g in range(G):
        for s in range(S):
            choice = sorted(range(E), key=lambda e: -probs[g, s, e])[:k]
            idx[g, s] = choice
            chosen = probs[g, s, choice]
            w[g, s] = chosen / chosen.sum() if renormalize else chosen
        tokens = [s for s in range(S) if valid[g, s]]
        if bpr:
            tokens = sorted(tokens, key=lambda s: -probs[g, s].max())  # python sort is stable
        fill = [0] * E
        for slot in range(k):
            for s in tokens:
                e = idx[g, s, slot]
                place = fill[e]
                fill[e] += 1
                if cap is None or place < cap:
                    keep[g, s, slot] = True
                    pos[g, s, slot] = place
    return idx, np.where(keep, w, 0.0), keep, pos


def route_expert_choice(probs, valid, cap):
    """Each expert takes its ``cap`` valid tokens of highest probability (fewer if fewer are valid).
    Returns keep [G, S, E] and combine [G, S, E]."""
    probs = np.asarray(probs, dtype=np.float64)
    G, S, E = probs.shape
    keep = np.zeros((G, S, E), dtype=bool)
    for g in range(G):
        for e in range(E):
            tokens = sorted((s for s in range(S) if valid[g, s]), key=lambda s: -probs[g, s, e])
            for s in tokens[:cap]:
                keep[g, s, e] = True
    return keep, np.where(keep, probs, 0.0)


# ------------------------------------------------------------------------------------------- experts
def act(h: np.ndarray, activation: str) -> np.ndarray:
    if activation == "gelu":
        erf = np.vectorize(math.erf)
        return 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    if activation == "swiglu":
        half = h.shape[-1] // 2
        gate, up = h[..., :half], h[..., half:]
        return gate / (1.0 + np.exp(-gate)) * up
    raise ValueError(activation)


def expert(x, w1, b1, w2, b2, activation):
    """One expert MLP on x [N, D] with input-major weights w1 [D, H'], w2 [H, D]."""
    h = x @ w1 + (0.0 if b1 is None else b1)
    return act(h, activation) @ w2 + (0.0 if b2 is None else b2)


def moe_combine(x, idx, cw, keep, w1, b1, w2, b2, activation):
    """y[t] = sum_k keep[t,k] * cw[t,k] * expert_{idx[t,k]}(x[t]), one token at a time."""
    T, D = x.shape
    y = np.zeros((T, D))
    for t in range(T):
        for k in range(idx.shape[1]):
            if keep[t, k]:
                e = idx[t, k]
                y[t] += cw[t, k] * expert(x[t:t + 1], w1[e], None if b1 is None else b1[e], w2[e],
                                          None if b2 is None else b2[e], activation)[0]
    return y


# -------------------------------------------------------------------------------------------- losses
def cv2(v: np.ndarray) -> float:
    """(population std / mean)^2."""
    v = np.asarray(v, dtype=np.float64)
    return float((v.std(ddof=0) / v.mean()) ** 2)


def importance_loss(clean_probs, valid) -> float:
    vals = [cv2((clean_probs[g] * valid[g][:, None]).sum(0)) for g in range(len(valid)) if valid[g].any()]
    return float(np.mean(vals))


def phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def load_loss(logits, noisy_logits, noise_std, k, valid) -> float:
    """V-MoE load loss: P(expert e in the top-k of a fresh noise draw) = 1 - Phi((kth noisy - logit)/std),
    averaged over the group's valid tokens, cv^2 over experts, mean over groups."""
    G, S, E = logits.shape
    vals = []
    for g in range(G):
        rows = []
        for s in range(S):
            if not valid[g, s]:
                continue
            thr = sorted(noisy_logits[g, s], reverse=True)[k - 1]
            rows.append([1.0 - phi((thr - logits[g, s, e]) / noise_std) for e in range(E)])
        if rows:
            vals.append(cv2(np.mean(rows, axis=0)))
    return float(np.mean(vals))


def switch_loss(probs, valid) -> float:
    G, S, E = probs.shape
    vals = []
    for g in range(G):
        p = probs[g][valid[g]]
        if len(p) == 0:
            continue
        f = np.bincount(p.argmax(-1), minlength=E) / len(p)
        vals.append(E * float((f * p.mean(0)).sum()))
    return float(np.mean(vals))


def z_loss(logits, valid) -> float:
    l = np.asarray(logits, dtype=np.float64)[np.asarray(valid, dtype=bool)]
    m = l.max(-1)
    lse = m + np.log(np.exp(l - m[:, None]).sum(-1))
    return float((lse**2).mean())


def entropy(p) -> float:
    p = np.asarray(p, dtype=np.float64)
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())
