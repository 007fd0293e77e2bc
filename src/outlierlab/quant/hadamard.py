"""Orthogonal rotations for QuaRot-style fusing (arXiv 2404.00456): randomized Hadamard and random orthogonal.

    hadamard(n)              an n x n Hadamard matrix (entries +-1, H H^T = n I), or None when this module cannot
                             build one: Sylvester's 2^k, or Paley I (order q + 1 for a prime q = 3 mod 4) Kronecker a
                             power of two (576 = 72 x 8, 640 = 20 x 32, 1536 = 12 x 128), as QuaRot's own tables
                             do for sizes that are not a power of two
    rotation(n, kind, seed)  (Q, note): Q = H diag(s) / sqrt(n) with seeded random signs s (kind="hadamard"), or
                             the Q of a QR decomposition of a seeded Gaussian matrix (kind="orthogonal"). A
                             Hadamard size this module cannot build falls back to the orthogonal one, and the note
                             says so. float64, so fusing into float32 weights adds no visible error.
"""
from __future__ import annotations

import torch

KINDS = ("hadamard", "orthogonal")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _sylvester(n: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def _paley(order: int) -> torch.Tensor:
    """Paley construction I: q = order - 1 prime, q = 3 mod 4; H = I + [[0, 1^T], [-1, Q]], Q the Jacobsthal
    matrix Q[i, j] = chi(j - i) (the quadratic character mod q)."""
    q = order - 1
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    jacobsthal = chi[(index[None, :] - index[:, None]) % q]
    skew = torch.zeros(order, order, dtype=torch.float64)
    skew[0, 1:], skew[1:, 0], skew[1:, 1:] = 1.0, -1.0, jacobsthal
    return torch.eye(order, dtype=torch.float64) + skew


def hadamard(n: int) -> torch.Tensor | None:
    """An n x n Hadamard matrix (float64), or None when n is not 2^k x (a Paley I order)."""
    power = 1
    while n % (power * 2) == 0:
        power *= 2
    for small in (power, *(power // 2 ** j for j in range(1, power.bit_length()))):
        order = n // small
        if order == 1:
            return _sylvester(n)
        if order % 4 == 0 and _is_prime(order - 1) and (order - 1) % 4 == 3:
            return torch.kron(_paley(order), _sylvester(small))
    return None


def rotation(n: int, kind: str = "hadamard", seed: int = 0) -> tuple[torch.Tensor, str]:
    """(Q [n, n] float64 orthogonal, a note saying which rotation it is)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind} is not one of: {', '.join(KINDS)}")
    generator = torch.Generator().manual_seed(seed)
    if kind == "hadamard":
        matrix = hadamard(n)
        if matrix is not None:
            signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
            return matrix * signs[None, :] / n ** 0.5, f"randomized Hadamard of size {n} (seed {seed})"
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))[None, :]  # Haar-distributed (Mezzadri 2007)
    note = f"random orthogonal of size {n} (seed {seed})"
    if kind == "hadamard":
        note += f": no Hadamard of size {n} here (not 2^k x a Paley I order), so the orthogonal fallback"
    return q, note
