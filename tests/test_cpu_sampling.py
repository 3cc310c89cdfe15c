"""The CPU sampler (inverse CDF, one uniform number per row): its draws follow the filtered, renormalised softmax
that the device path samples from, its kept sets are those of `apply_top_k_top_p_min_p` (also when a set reaches past
the candidates and the full sort takes over), greedy rows stay argmax, and a seeded row's draw depends only on its
own generator. Bound: over 40,000 draws the total variation from the reference stays under 3x its expected value
from sampling noise alone, 0.5 * sum_i sqrt(2 p_i (1 - p_i) / (pi N)), and under 0.03."""

import math

import torch

from weavelm.sample.cpu_sampling import CANDIDATES, sample_cpu
from weavelm.sample.sampler import SamplingMetadata, apply_top_k_top_p_min_p


def meta(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generators=None):
    t, k, p, mp = (torch.full((n,), v) for v in (float(temperature), top_k, float(top_p), float(min_p)))
    return SamplingMetadata(t, k.long(), p, mp, False, top_k > 0, top_p < 1, min_p > 0, generators or {}, False)


def reference(logits_row, m):
    """The distribution the device path samples from: filters on the temperature-scaled row, then softmax."""
    one = SamplingMetadata(m.temperature[:1], m.top_k[:1], m.top_p[:1], m.min_p[:1], False, m.any_top_k,
                           m.any_top_p, m.any_min_p, {}, False)
    return apply_top_k_top_p_min_p(logits_row[None] / m.temperature[0], one).softmax(-1)[0].double()


def empirical(row, m, draws=20000):
    ids = sample_cpu(row.repeat(draws, 1), m)
    return torch.bincount(ids, minlength=row.shape[0]).double() / draws


def tv(a, b):
    return 0.5 * (a - b).abs().sum().item()


def close(got, want, draws=20000):
    noise = 0.5 * sum(math.sqrt(2 * p * (1 - p) / (math.pi * draws)) for p in want.tolist())
    return tv(got, want) < min(3 * noise, 0.03)


def test_plain_temperature_follows_the_softmax_across_buckets():
    row = torch.full((700,), -12.0)  # three buckets, the last one partial; the mass on tokens in each
    row[[3, 255, 256, 300, 511, 650, 699]] = torch.tensor([2.0, 1.0, 0.5, 1.5, 0.0, 1.0, 0.3])
    for temperature in (0.7, 1.3):
        m = meta(20000, temperature)
        assert close(empirical(row, m), reference(row, m))


def test_filtered_rows_follow_the_renormalised_distribution():
    g = torch.Generator().manual_seed(1)
    row = torch.randn(5000, generator=g) * 4
    for kw in (dict(top_k=20), dict(top_p=0.8), dict(min_p=0.05), dict(top_k=50, top_p=0.9, min_p=0.01)):
        m = meta(20000, 0.9, **kw)
        want = reference(row, m)
        got = empirical(row, m)
        assert got[want == 0].sum() == 0, kw  # nothing outside the kept set
        assert close(got, want), (kw, tv(got, want))


def test_a_nucleus_past_the_candidates_takes_the_full_sort():
    row = torch.zeros(4 * CANDIDATES)  # flat: top_p 0.9 keeps ~90% of 2048 tokens
    m = meta(300, 1.0, top_p=0.9)
    kept = torch.isfinite(apply_top_k_top_p_min_p(row[None], meta(1, 1.0, top_p=0.9)))[0]
    ids = sample_cpu(row.repeat(300, 1), m)
    assert kept[ids].all() and len(set(ids.tolist())) > 250
    assert ids.max() >= CANDIDATES  # beyond the candidates: the fallback drew them


def test_greedy_rows_and_seeds():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 1000, generator=g)
    temps = torch.tensor([0.0, 1.0, 0.0, 1.0])
    m = meta(4, 1.0, top_p=0.95)
    m.temperature = temps
    m.generators = {1: torch.Generator().manual_seed(7)}
    first = sample_cpu(logits, m)
    assert first[0] == logits[0].argmax() and first[2] == logits[2].argmax()
    other = logits.clone()
    other[3] = torch.randn(1000, generator=g)  # another companion row
    m.generators = {1: torch.Generator().manual_seed(7)}
    assert sample_cpu(other, m)[1] == first[1]
