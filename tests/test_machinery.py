"""machinery.py: the run folder, atomic writes, DDP shares; what a run can count on at its edges."""
import pytest

from machinery import noise_free_share


def test_noise_free_share_of_the_global_batch():
    for batch, r_t0, world in [(1024, 0.5, 8), (256, 0.05, 8), (256, 0.05, 16), (32, 0.25, 3)]:
        shares = [noise_free_share(batch, r_t0, rank, world) for rank in range(world)]
        assert sum(shares) == int(batch * r_t0) and max(shares) - min(shares) <= 1


