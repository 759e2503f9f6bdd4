"""Dense MLPs with the same call signature as :class:`zoo.moe.MoELayer`, so a block takes either."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from zoo.layers.activations import apply_activation


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``; SwiGLU packs gate and up into ``fc1`` (``[gate | up]``, like the experts).

    ``mask`` and ``modality`` are accepted and ignored, as a dense MLP treats every token alike.
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu_tanh", bias: bool = True,
                 drop: float = 0.0) -> None:
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(dim, 2 * hidden_dim if activation == "swiglu" else hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, modality: Optional[Tensor] = None) -> Tensor:
        return self.fc2(self.drop(apply_activation(self.fc1(x), self.activation)))
