"""The reference line: multinomial logistic regression on the frozen backbone's embeddings.

It is also where a new task starts: with every scaling vector at one, the task module computes
exactly the backbone's mean-pooled embedding, so a head initialised from the probe *is* the probe,
and training moves away from it; the probe itself is kept only where the held-out slice shows the
trained module clearly worse (training/recipe.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass
class Probe:
    weight: torch.Tensor  # (labels, hidden)
    bias: torch.Tensor  # (labels,)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return (features @ self.weight.T + self.bias).argmax(-1)

    def accuracy(self, features: torch.Tensor, targets: torch.Tensor) -> float:
        if len(targets) == 0:
            return 0.0
        return int((self.predict(features) == targets).sum()) / len(targets)


def fit_probe(features: torch.Tensor, targets: torch.Tensor, num_labels: int,
              inverse_regularisation: float = 1.0, max_iterations: int = 200) -> Probe:
    """L2-regularised logistic regression, scikit-learn's objective with C=1, solved by L-BFGS."""
    features = features.detach().double()
    weight = torch.zeros(num_labels, features.shape[1], dtype=torch.double, requires_grad=True)
    bias = torch.zeros(num_labels, dtype=torch.double, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=max_iterations,
                                  line_search_fn="strong_wolfe")
    penalty = 1.0 / (2.0 * inverse_regularisation * len(features))

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, targets) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return Probe(weight.detach().float(), bias.detach().float())
