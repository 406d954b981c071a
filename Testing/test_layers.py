import pytest
import torch

from ACSGRegistrationLib.layers import (affine_coordinates, grid_sample, identity_grid, integrate_velocity,
                                        invert_affine, resize_field, sample, warp)
from ACSGRegistrationLib.metrics import jacobian_determinant


def smooth_field(shape, amplitude, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 3, 3, 3, generator=g) * amplitude
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def test_zero_velocity_integrates_to_identity():
    v = torch.zeros(2, 3, 8, 12, 10)
    u = integrate_velocity(v, 7)
    assert torch.count_nonzero(u) == 0
    image = torch.rand(2, 1, 8, 12, 10)
    assert torch.allclose(warp(image, u), image, atol=1e-6)


def test_sample_at_identity_returns_the_image():
    image = torch.rand(1, 1, 5, 6, 7)
    grid = identity_grid((5, 6, 7))
    assert torch.allclose(sample(image, grid), image, atol=1e-6)


def test_constant_velocity_integrates_to_translation():
    v = torch.zeros(1, 3, 16, 16, 16)
    v[:, 2] = 1.5  # x shift in voxels
    u = integrate_velocity(v, 7)
    inner = u[:, :, 4:-4, 4:-4, 4:-4]
    assert torch.allclose(inner[:, 2], torch.full_like(inner[:, 2], 1.5), atol=1e-4)
    assert inner[:, :2].abs().max() < 1e-5


def test_negated_velocity_gives_the_inverse():
    shape = (16, 20, 18)
    v = smooth_field(shape, 1.0)
    u, u_inv = integrate_velocity(v, 7), integrate_velocity(-v, 7)
    composed = (u + warp(u_inv, u, padding_mode="border"))[:, :, 3:-3, 3:-3, 3:-3]  # (phi_inv o phi)(x) - x
    assert u.abs().max() > 1.0  # the test is not vacuous
    assert composed.abs().max() < 0.1 and composed.abs().mean() < 0.02


def test_integrated_field_has_positive_jacobian():
    v = smooth_field((16, 16, 16), 4.0, seed=3)
    j = jacobian_determinant(integrate_velocity(v, 7)[0].numpy())
    assert j.min() > 0


def test_affine_inverse_round_trip():
    m = torch.tensor([[[1.05, 0.1, 0.0, 2.0], [-0.1, 0.95, 0.05, -1.0], [0.0, 0.02, 1.1, 0.5]]])
    shape = (6, 8, 10)
    forward = affine_coordinates(m, shape, shape)
    back = affine_coordinates(invert_affine(m), shape, shape, forward)
    assert torch.allclose(back, identity_grid(shape), atol=1e-4)


def test_resize_field_rescales_vectors():
    u = torch.ones(1, 3, 8, 8, 8)
    assert torch.allclose(resize_field(u, (15, 15, 15)), torch.full((1, 3, 15, 15, 15), 2.0))


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("mode,padding", [("bilinear", "zeros"), ("bilinear", "border"), ("nearest", "zeros")])
def test_grid_sample_in_slabs_equals_one_call(threads, mode, padding):
    """The CPU's one-slab-per-thread sampling gives exactly F.grid_sample's values, odd depths included."""
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 9, 10, 11, generator=g)
    grid = torch.rand(1, 7, 8, 6, 3, generator=g) * 2.4 - 1.2  # some points outside the volume
    expected = torch.nn.functional.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = grid_sample(image, grid, mode, padding)
    finally:
        torch.set_num_threads(before)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
