import pytest
import torch

from tsm_trainer.core.intervals import expert_index, interval_bounds, interval_timestep_range, parse_scales


def test_expert_index_matches_design_examples():
    # docs/design.md: T=1000, n=8: expert 0 is [0, 125), expert 7 is [875, 1000).
    assert expert_index(0, 8) == 0
    assert expert_index(124, 8) == 0
    assert expert_index(125, 8) == 1
    assert expert_index(874.999, 8) == 6
    assert expert_index(875, 8) == 7
    assert expert_index(999, 8) == 7
    # Clamped outside [0, T): fractional k-diffusion t can reach T, flow sigma*T can be T.
    assert expert_index(1000.0, 8) == 7
    assert expert_index(-0.5, 8) == 0


def test_tensor_forms_agree_with_scalar_form():
    ints = torch.arange(1000)
    floats = torch.linspace(0, 999.999, 4001, dtype=torch.float32)
    for n in (1, 2, 3, 7, 8, 16):
        assert expert_index(ints, n).tolist() == [expert_index(int(t), n) for t in ints]
        assert expert_index(floats, n).tolist() == [expert_index(float(t), n) for t in floats.double()]


def test_bins_are_even_on_zero_based_timesteps():
    counts = torch.bincount(expert_index(torch.arange(1000), 8), minlength=8)
    assert counts.tolist() == [125] * 8
    counts = torch.bincount(expert_index(torch.arange(1000), 3), minlength=3)
    assert counts.tolist() == [334, 333, 333]  # [0,333.3) -> 334 integers, then 333, 333


def test_interval_ranges_partition_the_axis():
    for n in (1, 3, 8, 16):
        covered = []
        for i in range(n):
            lo, hi = interval_timestep_range(i, n)
            assert all(expert_index(t, n) == i for t in range(lo, hi))
            covered.extend(range(lo, hi))
            blo, bhi = interval_bounds(i, n)
            assert blo <= lo and hi - 1 < bhi
        assert covered == list(range(1000))


def test_parse_scales():
    assert parse_scales("8") == [8]
    assert parse_scales("8, 1") == [8, 1]
    assert parse_scales([8, 4, 1]) == [8, 4, 1]
    with pytest.raises(ValueError, match="not an integer"):
        parse_scales("8,x")
    with pytest.raises(ValueError, match="distinct"):
        parse_scales("8,8")
    with pytest.raises(ValueError, match=">= 1"):
        parse_scales("0")
    with pytest.raises(ValueError, match="expert 8 does not exist"):
        interval_timestep_range(8, 8)
