"""Independent float64 oracles shared by the tests."""

import torch


def autograd_hessian(W: torch.Tensor) -> torch.Tensor:
    """Hessian of W ↦ σ1(W) by autograd, permuted to column-major vec order (docs/theory.md §5)."""
    m, n = W.shape
    H = torch.autograd.functional.hessian(lambda X: torch.linalg.svdvals(X)[0], W)
    return H.permute(1, 0, 3, 2).reshape(m * n, m * n)


def autograd_jacobian(W: torch.Tensor) -> torch.Tensor:
    """Gradient of W ↦ σ1(W) by autograd, as an (m, n) matrix."""
    X = W.detach().clone().requires_grad_(True)
    torch.linalg.svdvals(X)[0].backward()
    return X.grad
