"""The rejection sampler (weavelm/sample/rejection.py) preserves the target distribution.

Statistical bound used throughout: with N independent draws from a distribution over V categories, the total
variation distance between the empirical and the true distribution has expectation <= sqrt(V / N) / 2; the tests
draw N = 200_000 over V = 6 (bound ~0.0027) and assert TV < 0.01, which a wrong rule misses by far (accepting
every draft, or sampling the recovered token from p instead of norm(max(p - q, 0)), gives TV > 0.05 here).
Seeds are fixed, so the tests are deterministic.
"""

import numpy as np
import torch

from weavelm.sample.rejection import emitted_lists, rejection_sample

V = 6
N = 200_000


def _tv(counts: np.ndarray, p: torch.Tensor) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - p.numpy()).sum())


def _dists(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p0, p1, p2 = (torch.rand(V, generator=g) ** 3 for _ in range(3))
    return p0 / p0.sum(), p1 / p1.sum(), p2 / p2.sum()


def test_first_and_second_tokens_follow_the_target_with_a_draft_distribution():
    torch.manual_seed(0)
    p0, p1, p2 = _dists(1)
    g = torch.Generator().manual_seed(2)
    q0, q1 = torch.rand(V, generator=g), torch.rand(V, generator=g)
    q0, q1 = q0 / q0.sum(), q1 / q1.sum()
    d0 = torch.multinomial(q0, N, replacement=True, generator=g)
    d1 = torch.multinomial(q1, N, replacement=True, generator=g)
    probs = torch.stack([p0, p1, p2]).repeat(N, 1)  # per request: positions 0, 1, 2 (bonus)
    drafts = torch.stack([d0, d1], dim=1).reshape(-1)
    draft_probs = torch.stack([q0, q1]).repeat(N, 1)
    out = rejection_sample(probs, drafts, draft_probs, [2] * N, {}).numpy()
    assert out.shape == (N, 3)
    first = np.bincount(out[:, 0], minlength=V)
    assert _tv(first, p0) < 0.01
    assert _tv(np.bincount(d0.numpy(), minlength=V), p0) > 0.05  # the drafts alone are far off: the rule matters
    second = out[out[:, 1] >= 0, 1]  # given the first draft was accepted, the second token follows p1
    assert len(second) > N // 4
    assert _tv(np.bincount(second, minlength=V), p1) < 0.01
    both = out[:, 2] >= 0  # both drafts accepted: the bonus token follows p2
    assert _tv(np.bincount(out[both, 2], minlength=V), p2) < 0.02
    # accepted drafts are emitted unchanged
    assert (out[out[:, 1] >= 0, 0] == d0.numpy()[out[:, 1] >= 0]).all()


def test_point_mass_drafts_follow_the_target():
    """n-gram drafts are deterministic: q is a point mass at the draft, accepted with probability p(d)."""
    torch.manual_seed(3)
    p0, p1, _ = _dists(4)
    d = int(p0.argmax())
    drafts = torch.full((N,), d, dtype=torch.int64)
    probs = torch.stack([p0, p1]).repeat(N, 1)
    out = rejection_sample(probs, drafts, None, [1] * N, {}).numpy()
    assert _tv(np.bincount(out[:, 0], minlength=V), p0) < 0.01
    accepted = out[:, 1] >= 0
    assert abs(accepted.mean() - float(p0[d])) < 0.01
    assert _tv(np.bincount(out[accepted, 1], minlength=V), p1) < 0.02


def test_random_drafts_verified_as_point_masses_still_follow_the_target():
    """The point-mass rule is exact for any draft chosen independently of the verification's randomness (the
    runner falls back to it for drafts whose distribution is missing); q only raises the acceptance rate."""
    torch.manual_seed(6)
    p0, p1, _ = _dists(7)
    drafts = torch.randint(0, V, (N,))
    out = rejection_sample(torch.stack([p0, p1]).repeat(N, 1), drafts, None, [1] * N, {}).numpy()
    assert _tv(np.bincount(out[:, 0], minlength=V), p0) < 0.01


def test_greedy_rows_accept_exactly_the_argmax_prefix():
    one_hot = torch.eye(V)
    target = [3, 1, 4, 0]  # the target's argmax at positions 0..3
    probs = one_hot[target]
    for drafts, expected in (([3, 1, 4], [3, 1, 4, 0]), ([3, 2, 4], [3, 1]), ([5, 1, 4], [3])):
        out = rejection_sample(probs, torch.tensor(drafts), None, [3], {})
        assert emitted_lists(out.numpy()) == [expected]


def test_variable_draft_counts_and_empty_rows():
    one_hot = torch.eye(V)
    # request 0: 2 drafts (both right) + bonus, request 1: no draft, request 2: 1 wrong draft (3, argmax 0)
    probs = one_hot[[1, 2, 3, 5, 0, 4]]
    out = rejection_sample(probs, torch.tensor([1, 2, 3]), None, [2, 0, 1], {})
    assert emitted_lists(out.numpy()) == [[1, 2, 3], [5], [0]]


def test_seeded_requests_are_reproducible_and_independent_of_the_batch():
    p0, p1, p2 = _dists(5)
    probs = torch.stack([p0, p1, p2])

    def run(seed: int, others: int) -> list[int]:
        torch.manual_seed(others)  # unseeded neighbours draw from the global generator
        n = 1 + others
        gen = torch.Generator().manual_seed(seed)
        out = rejection_sample(probs.repeat(n, 1), torch.tensor([1, 2] * n), None, [2] * n, {0: gen})
        return emitted_lists(out.numpy())[0]

    runs = [run(11, others) for others in (0, 3, 7)]
    assert runs[0] == runs[1] == runs[2]
    assert len({tuple(run(s, 0)) for s in range(40)}) > 1  # the seed matters
