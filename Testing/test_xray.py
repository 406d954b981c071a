"""CT to X-ray geometry and differentiable DRRs (ACSGRegistrationLib.xray): rays against analytic chord lengths of
a phantom, projections against the camera's formula, pose gradients against finite differences (both
projectors: marching along the rays and Joseph's method across the planes), and the second derivative ProST's
training needs."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ACSGRegistrationLib.errors import InputError
from ACSGRegistrationLib.geometry import ijk_to_physical_matrix
from ACSGRegistrationLib.xray.camera import CArm, check_pose, look_at, pose_from_parameters, read_pose
from ACSGRegistrationLib.xray.drr import Volume, render, render_by_planes


def ball_phantom(radius=30.0, spacing=1.0, size=80, centre=(4.0, -3.0, 2.0), supersample=4):
    """A ball of attenuation 1/mm (voxels hold the fraction of their volume inside it) on an oblique grid."""
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    grid = (np.arange(size) - (size - 1) / 2.0) * spacing
    inside = np.zeros((size, size, size))
    for ok in offsets:
        for oj in offsets:
            for oi in offsets:
                k, j, i = np.meshgrid(grid + ok * spacing, grid + oj * spacing, grid + oi * spacing, indexing="ij")
                inside += (i ** 2 + j ** 2 + k ** 2) <= radius ** 2
    image = sitk.GetImageFromArray((inside / supersample ** 3).astype(np.float32))
    angle = np.deg2rad(20.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(direction.ravel().tolist())
    image.SetSpacing([spacing] * 3)
    half = (size - 1) / 2.0 * spacing
    image.SetOrigin((np.asarray(centre) - direction @ np.full(3, half)).tolist())
    return image, np.asarray(centre), radius


CARM = CArm(1000.0, (1.0, 1.0), (64, 48), (30.0, 25.0))


PROJECTORS = {"rays": lambda volume, carm, pose: render(volume, carm, pose, samples=600),
              "planes": render_by_planes}


@pytest.mark.parametrize("projector", PROJECTORS)
def test_line_integrals_are_the_chord_lengths_of_a_ball(projector):
    image, centre, radius = ball_phantom()
    volume = Volume.from_image(image, hounsfield=False, dtype=torch.float64)
    pose = look_at(centre + [6.0, 0.0, -4.0], 700.0, lao_deg=25.0, cranial_deg=-10.0)
    carm = CArm(1000.0, (2.0, 2.0), (64, 48), (30.0, 25.0))  # the whole ball and air around it in view
    drr = PROJECTORS[projector](volume, carm, torch.as_tensor(pose)).numpy()
    # Analytic: the distance b from the ball's centre to each pixel's ray, chord 2 sqrt(r^2 - b^2).
    source = -pose[:3, :3].T @ pose[:3, 3]
    pixels = carm.detector_points(dtype=torch.float64).numpy()
    rays = pixels / np.linalg.norm(pixels, axis=-1, keepdims=True) @ pose[:3, :3]  # R^T d, in LPS
    to_centre = centre - source
    along = rays @ to_centre
    b2 = (to_centre @ to_centre) - along ** 2
    chord = 2 * np.sqrt(np.clip(radius ** 2 - b2, 0, None))
    # Through the ball (chords of half its diameter and more): within 1 %. (Grazing rays run along the surface,
    # whose voxels hold partial volumes: there a sharp chord is not what a voxel grid can give.)
    through = chord >= radius
    assert through.sum() > 300
    error = np.abs(drr[through] - chord[through]) / chord[through]
    assert error.max() < 0.01, error.max()
    missing = np.sqrt(b2) > radius + 2.0
    assert missing.sum() > 100 and np.abs(drr[missing]).max() < 1e-9  # rays that miss the ball see nothing


def test_sampling_only_where_the_rays_meet_the_volume_changes_no_pixel(monkeypatch):
    """The renderer skips the samples that no ray of the batch takes within a voxel of the grid: the DRRs
    are those of every sample across the bounding sphere, for views through the volume, beside it (some
    rays missing it) and turned 90 degrees, batched; and it does skip (fewer samples than the sphere's)."""
    from ACSGRegistrationLib.xray import drr
    image, centre, _ = ball_phantom(size=40, spacing=2.0)
    volume = Volume.from_image(image + 0.01, hounsfield=False, dtype=torch.float64)  # non-zero up to its faces
    poses = torch.as_tensor(np.stack([look_at(centre + offset, 700.0, lao_deg=lao, cranial_deg=cranial)
                                      for offset, lao, cranial in (((0, 0, 0), 0.0, 0.0), ((50, 0, 20), 30.0, 10.0),
                                                                   ((0, 10, 0), 90.0, -15.0))]))
    carm = CArm(1000.0, (1.5, 1.5), (48, 40), (20.0, 22.0))
    taken = []
    original = drr.samples_inside
    monkeypatch.setattr(drr, "samples_inside", lambda *a: taken.append(original(*a)) or taken[-1])
    clipped = render(volume, carm, poses)
    alone = torch.stack([render(volume, carm, pose) for pose in poses])  # each pose's own, narrower range
    monkeypatch.setattr(drr, "samples_inside", lambda *a: slice(None))
    full = render(volume, carm, poses)
    assert float(full.abs().max()) > 10.0 and float((full == 0).float().mean()) > 0.05  # rays through and past it
    for image in (clipped, alone):
        assert torch.allclose(image, full, rtol=0, atol=1e-9), float((image - full).abs().max())
    monkeypatch.setattr(drr, "samples_inside", lambda *a: taken.append(original(*a)) or taken[-1])
    render(volume, carm, poses[0])  # about its depth (the grid is turned 20 degrees), not its sphere's diameter
    samples = int(torch.ceil(2 * volume.bounding_sphere()[1] / 2.0))
    assert taken[-1].stop - taken[-1].start < 0.85 * samples


@pytest.mark.parametrize("projector", PROJECTORS)
def test_a_point_projects_where_the_camera_formula_says(projector):
    image = sitk.Image(60, 60, 60, sitk.sitkFloat32)
    image.SetOrigin((-30.0, -30.0, -30.0))
    values = np.zeros((60, 60, 60), np.float32)
    values[40, 22, 35] = 1.0  # index (35, 22, 40)
    blob = sitk.GetImageFromArray(values)
    blob.CopyInformation(image)
    blob = sitk.SmoothingRecursiveGaussian(blob, 1.5)
    point = np.asarray(blob.TransformIndexToPhysicalPoint((35, 22, 40)))
    pose = look_at([0.0, 0.0, 0.0], 600.0, lao_deg=30.0, cranial_deg=15.0)
    carm = CArm(1100.0, (0.8, 0.8), (96, 96))
    drr = PROJECTORS[projector](Volume.from_image(blob, hounsfield=False, dtype=torch.float64), carm,
                                torch.as_tensor(pose)).numpy()
    rows, columns = np.indices(drr.shape)
    weights = drr / drr.sum()
    peak = np.array([(weights * columns).sum(), (weights * rows).sum()])
    expected = carm.project((pose[:3, :3] @ point + pose[:3, 3])[None])[0]
    assert np.linalg.norm(peak - expected) < 0.3, (peak, expected)
    # look_at puts its target on the principal point.
    target = pose[:3, :3] @ np.zeros(3) + pose[:3, 3]
    assert np.allclose(carm.project(target[None])[0], carm.principal_point_px)


@pytest.mark.parametrize("projector", ["rays", "rays twice differentiable", "planes"])
def test_pose_gradient_matches_finite_differences(projector):
    """Every sampler: marching along the rays with PyTorch's grid_sample (first derivatives) and with the gathers
    (differentiable twice), and Joseph's method across the planes (2D grid_sample)."""
    image, centre, _ = ball_phantom(radius=20.0, size=56, supersample=2)
    # An off-centre, uneven object so that every pose parameter changes the image.
    values = sitk.GetArrayFromImage(image)
    values[30:40, 20:30, 25:45] += 0.5
    lumpy = sitk.GetImageFromArray(values)
    lumpy.CopyInformation(image)
    # Trilinear interpolation is piecewise smooth: a smooth volume (as Volume.from_image's resampling gives) and
    # a smooth loss, so that central differences measure the derivative and not the kinks between voxels.
    volume = Volume.from_image(sitk.SmoothingRecursiveGaussian(lumpy, 1.0), hounsfield=False, dtype=torch.float64)
    reference = torch.as_tensor(look_at(centre, 650.0, lao_deg=10.0))
    pivot = torch.as_tensor(centre)
    rows, columns = np.indices((CARM.size[1], CARM.size[0]))
    weights = torch.as_tensor(np.sin(rows / 5.0) + np.cos(columns / 7.0))
    carm = CARM

    def loss(p):
        pose = pose_from_parameters(p, reference, pivot)
        if projector == "planes":
            return (render_by_planes(volume, carm, pose) * weights).sum()
        return (render(volume, carm, pose, samples=200, second_order="twice" in projector) * weights).sum()

    p0 = torch.tensor([0.03, -0.02, 0.05, 2.0, -1.5, 3.0], dtype=torch.float64, requires_grad=True)
    grad = torch.autograd.grad(loss(p0), p0)[0].numpy()
    steps = [1e-4] * 3 + [1e-2] * 3
    numeric = []
    for n, h in enumerate(steps):
        e = torch.zeros(6, dtype=torch.float64)
        e[n] = h
        with torch.no_grad():
            numeric.append((loss(p0 + e) - loss(p0 - e)).item() / (2 * h))
    numeric = np.asarray(numeric)
    assert np.all(np.abs(grad - numeric) <= 0.05 * np.abs(numeric) + 1e-6), (grad, numeric)


def test_second_derivative_reaches_what_the_similarity_learns_from():
    """ProST's loss differentiates the pose gradient: that path must carry gradients to the volume's features
    (here the attenuation itself stands in for them)."""
    image, centre, _ = ball_phantom(radius=15.0, size=40, supersample=1)
    volume = Volume.from_image(image, hounsfield=False, dtype=torch.float64)
    features = volume.mu.clone().requires_grad_(True)
    volume = Volume(features, volume.index_to_lps)
    carm = CArm(1000.0, (2.0, 2.0), (24, 24))
    reference = torch.as_tensor(look_at(centre + [3.0, 0.0, 2.0], 600.0))
    target = render(Volume(features.detach(), volume.index_to_lps), carm, reference, samples=80)
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    moved = render(volume, carm, pose_from_parameters(p, reference, torch.as_tensor(centre)), samples=80,
                   second_order=True)
    similarity = -((moved - target - 0.1) ** 2).sum()
    pose_gradient = torch.autograd.grad(similarity, p, create_graph=True)[0]
    direction = torch.tensor([0.2, -0.1, 0.3, 1.0, 0.5, -0.7], dtype=torch.float64)
    torch.nn.functional.cosine_similarity(pose_gradient, direction, dim=0).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_geometry_and_pose_files(tmp_path):
    carm = CArm.from_dict({"source_to_detector_mm": 1020, "pixel_spacing_mm": [0.3, 0.4], "size": [512, 400]})
    assert carm.principal_point_px == (255.5, 199.5)
    assert CArm.from_dict(json.loads(json.dumps(carm.to_dict()))) == carm
    coarse = carm.scaled(4)
    assert coarse.size == (128, 100) and coarse.pixel_spacing_mm == pytest.approx((1.2, 1.6))
    assert coarse.principal_point_px == pytest.approx((63.5, 49.5))  # still the detector's centre
    with pytest.raises(InputError, match="missing size"):
        CArm.from_dict({"source_to_detector_mm": 1000, "pixel_spacing_mm": [1, 1]})
    with pytest.raises(InputError, match="must be positive"):
        CArm.from_dict({"source_to_detector_mm": -5, "pixel_spacing_mm": [1, 1], "size": [10, 10]})
    pose = look_at([10.0, -20.0, 5.0], 700.0, 20.0, -5.0)
    check_pose(pose, "look_at")
    path = tmp_path / "pose.json"
    path.write_text(json.dumps({"ct_to_source": pose.tolist()}))
    assert np.allclose(read_pose(str(path)), pose, atol=1e-12)
    sheared = pose.copy()
    sheared[0, 1] += 0.2
    path.write_text(json.dumps({"ct_to_source": sheared.tolist()}))
    with pytest.raises(InputError, match="not a rigid transform"):
        read_pose(str(path))
    path.write_text("{}")
    with pytest.raises(InputError, match="is not a pose file"):
        read_pose(str(path))


def test_both_projectors_give_the_same_drrs_of_a_ct_from_every_side():
    """Joseph's method across the planes and marching along the rays, on a real CT at the registration's 3 mm:
    AP views, laterals (rays along another grid axis), a view 40 degrees oblique, batched as a search batches
    them; each pose's DRR the same in the batch as alone (one plane axis serves the whole batch)."""
    from conftest import data_path
    from ACSGRegistrationLib.xray.camera import turned_about_long_axis
    volume = Volume.from_image(sitk.ReadImage(data_path("ct", "totalsegmentator-example", "ct.nii.gz")), spacing=3.0)
    centre = volume.bounding_sphere()[0].numpy().astype(np.float64)
    ap = [look_at(centre + [5.0, 0.0, -10.0], 700.0, lao_deg=lao, cranial_deg=cranial)
          for lao, cranial in ((0.0, 0.0), (8.0, -6.0), (40.0, 0.0))]
    carm = CArm(1020.0, (3.2, 3.2), (64, 64))
    for poses in (ap, [turned_about_long_axis(pose, centre) for pose in ap]):
        poses = torch.as_tensor(np.stack(poses), dtype=torch.float32)
        planes, rays = render_by_planes(volume, carm, poses), render(volume, carm, poses)
        for a, b in zip(planes, rays):
            a, b = a - a.mean(), b - b.mean()
            assert float((a * b).sum() / (a.norm() * b.norm())) > 0.999
        assert float((planes - rays).abs().max() / rays.abs().max()) < 0.03
        assert float((planes.mean() - rays.mean()).abs() / rays.mean()) < 0.002
        assert torch.allclose(render_by_planes(volume, carm, poses[0]), planes[0], rtol=0, atol=1e-4)


def test_nothing_behind_the_source_counts_when_it_stands_between_the_planes():
    """A source inside the volume's grid, between two blocks, looking at one: the DRR across the planes is the
    block ahead's thickness (10 mm), not both blocks'."""
    values = np.zeros((120, 40, 40), np.float32)  # (k, j, i), 1 mm voxels
    values[100:110, 15:25, 15:25] = 1.0  # ahead (+k)
    values[10:20, 15:25, 15:25] = 1.0  # behind
    volume = Volume.from_image(sitk.GetImageFromArray(values), hounsfield=False, dtype=torch.float64)
    pose = np.eye(4)
    pose[:3, 3] = -np.array([19.5, 19.5, 60.0])  # the source at index (19.5, 19.5, 60), looking along +k
    drr = render_by_planes(volume, CArm(1000.0, (1.0, 1.0), (16, 16)), torch.as_tensor(pose))
    assert torch.allclose(drr, torch.full_like(drr, 10.0), atol=0.05), (float(drr.min()), float(drr.max()))


@pytest.mark.parametrize("projector", PROJECTORS)
def test_drr_matches_diffdrr_at_the_same_geometry(projector):
    """DiffDRR (an independent renderer: Siddon's exact voxel traversal) and each of this package's projectors, on
    the same real CT, the same attenuation and the same rays: DiffDRR's own detector gives each pixel's ray, from
    which the C-arm and pose of this package are built, exactly."""
    pytest.importorskip("diffdrr", reason="pip install --no-deps -r requirements-xray-test.txt")
    from diffdrr.data import read
    from diffdrr.drr import DRR
    from diffdrr.pose import convert
    from conftest import data_path
    path = data_path("ct", "totalsegmentator-example", "ct.nii.gz")
    subject = read(path, orientation="AP")
    image = sitk.ReadImage(path)
    rows, columns = 48, 60
    reference = DRR(subject, sdd=1020.0, height=rows, delx=5.0, width=columns, dely=5.0, renderer="siddon")
    pose = convert(torch.tensor([[0.2, -0.1, 0.3]]), torch.tensor([[5.0, 850.0, -10.0]]),
                   parameterization="euler_angles", convention="ZXY")
    theirs = reference(pose).squeeze().detach().numpy().astype(np.float64)
    source, target = reference.detector(pose, None)
    # DiffDRR's world (RAS, centred on the volume) -> this CT's LPS, through the voxel indices both share.
    index_to_lps = ijk_to_physical_matrix(image)
    world_to_lps = index_to_lps @ np.linalg.inv(subject.volume.affine)

    def lps(points):
        points = points.detach().numpy().astype(np.float64).reshape(-1, 3)
        return points @ world_to_lps[:3, :3].T + world_to_lps[:3, 3]
    s, t = lps(source)[0], lps(target).reshape(rows, columns, 3)
    ex, ey = t[0, 1] - t[0, 0], t[1, 0] - t[0, 0]
    sx, sy = np.linalg.norm(ex), np.linalg.norm(ey)
    ex, ey = ex / sx, ey / sy
    if np.dot(np.cross(ex, ey), t[0, 0] - s) < 0:  # DiffDRR's radiological column order: mirror it
        t, theirs, ex = t[:, ::-1], theirs[:, ::-1], -ex
    ez = np.cross(ex, ey)
    sdd = float(np.dot(t[0, 0] - s, ez))
    foot = s + sdd * ez
    carm = CArm(sdd, (sx, sy), (columns, rows), (-np.dot(t[0, 0] - foot, ex) / sx, -np.dot(t[0, 0] - foot, ey) / sy))
    ct_to_source = np.eye(4)
    ct_to_source[:3, :3] = np.stack((ex, ey, ez))
    ct_to_source[:3, 3] = -ct_to_source[:3, :3] @ s
    check_pose(ct_to_source, "from DiffDRR's detector")
    ours_rays = carm.detector_points(dtype=torch.float64).numpy() @ ct_to_source[:3, :3] + s
    assert np.abs(ours_rays - t).max() < 0.05  # the same pixels, to a twentieth of a mm
    density = subject.density.data[0].permute(2, 1, 0).to(torch.float64).contiguous()  # (i, j, k) -> (k, j, i)
    volume = Volume(density, torch.as_tensor(index_to_lps))
    ours = PROJECTORS[projector](volume, carm, torch.as_tensor(ct_to_source)).numpy()
    a, b = (ours - ours.mean()) / ours.std(), (theirs - theirs.mean()) / theirs.std()
    assert (a * b).mean() > 0.99
    assert ours.mean() == pytest.approx(theirs.mean(), rel=0.01)  # the same line integrals, not only alike


def synthetic_dicom_xray(path, rows=40, columns=50, photometric="MONOCHROME2", **tags):
    """A DX image written with pydicom, with the C-arm geometry tags given (names of pydicom's keywords)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.StudyInstanceUID, ds.SeriesInstanceUID = "DX", "Phantom", generate_uid(), \
        generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    pixels = (np.arange(rows * columns, dtype=np.uint16).reshape(rows, columns) * 3)
    ds.PixelData = pixels.tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return pixels


def test_dicom_geometry_tags_fill_in_what_geometry_json_omits(tmp_path):
    from ACSGRegistrationLib.xray.images import carm_of, read_geometry, read_xray
    path = tmp_path / "xa.dcm"
    pixels = synthetic_dicom_xray(path, DistanceSourceToDetector="1040.5", DistanceSourceToPatient="760",
                                  ImagerPixelSpacing=["0.3", "0.2"], PositionerPrimaryAngle="-30.5",
                                  PositionerSecondaryAngle="12", photometric="MONOCHROME1")
    xray = read_xray(str(path))
    # As displayed: MONOCHROME1 stores high values for dark pixels.
    assert np.array_equal(xray.pixels, (65535 - pixels).astype(np.float32)) and xray.size == (50, 40)
    assert xray.source_to_patient_mm == 760 and xray.primary_angle_deg == -30.5 and xray.secondary_angle_deg == 12
    carm = carm_of(xray)
    # DICOM spacing is "row\column": columns 0.2 mm apart, rows 0.3 mm.
    assert carm.source_to_detector_mm == 1040.5 and carm.pixel_spacing_mm == (0.2, 0.3) and carm.size == (50, 40)
    # GEOMETRY.json wins where both give a value; the file fills in the rest.
    geometry = tmp_path / "geometry.json"
    geometry.write_text(json.dumps({"source_to_detector_mm": 1000.0, "principal_point_px": [26.0, 18.0]}))
    carm = carm_of(xray, read_geometry(str(geometry)))
    assert carm.source_to_detector_mm == 1000.0 and carm.principal_point_px == (26.0, 18.0)
    assert carm.pixel_spacing_mm == (0.2, 0.3)
    with pytest.raises(InputError, match="gives a 64 x 64 detector but .* has 50 x 40 pixels"):
        carm_of(xray, {"size": [64, 64]})
    # A PNG has no geometry: GEOMETRY.json must give it, and the message says which value is missing.
    png = tmp_path / "xray.png"
    sitk.WriteImage(sitk.GetImageFromArray((pixels // 256).astype(np.uint8)), str(png))
    plain = read_xray(str(png))
    with pytest.raises(InputError, match="does not give source_to_detector_mm and pixel_spacing_mm"):
        carm_of(plain)
    assert carm_of(plain, {"source_to_detector_mm": 980, "pixel_spacing_mm": [0.5, 0.5]}).size == (50, 40)
    with pytest.raises(InputError, match="X-ray image not found"):
        read_xray(str(tmp_path / "missing.dcm"))


def test_shutters_from_dicom_or_geometry_json_leave_their_shadow_out(tmp_path):
    """Where the shutters blocked the beam: the DICOM Display Shutter module (rectangular and circular, 1-based
    pixels, edges inclusive), else the X-Ray Collimator module, else GEOMETRY.json's ``exposed_field_px``
    (0-based, inclusive; it wins); refused where it lies off the image or leaves nothing exposed."""
    from ACSGRegistrationLib.xray.images import exposed_field, read_xray
    rows, columns = np.mgrid[1:41, 1:51]
    path = tmp_path / "shuttered.dcm"
    synthetic_dicom_xray(path, ShutterShape=["RECTANGULAR", "CIRCULAR"], ShutterLeftVerticalEdge="6",
                         ShutterRightVerticalEdge="45", ShutterUpperHorizontalEdge="3", ShutterLowerHorizontalEdge="38",
                         CenterOfCircularShutter=["20", "26"], RadiusOfCircularShutter="17")
    expected = (columns >= 6) & (columns <= 45) & (rows >= 3) & (rows <= 38) & ((rows - 20) ** 2 + (columns - 26) ** 2
                                                                                 <= 17 ** 2)
    xray = read_xray(str(path))
    assert np.array_equal(xray.exposed, expected) and 0 < expected.sum() < expected.size
    assert np.array_equal(exposed_field(xray), expected)
    collimated = tmp_path / "collimated.dcm"
    synthetic_dicom_xray(collimated, CollimatorShape="RECTANGULAR", CollimatorLeftVerticalEdge="1",
                         CollimatorRightVerticalEdge="40", CollimatorUpperHorizontalEdge="1",
                         CollimatorLowerHorizontalEdge="40")
    assert np.array_equal(read_xray(str(collimated)).exposed, columns <= 40)
    box = exposed_field(xray, {"exposed_field_px": [2, 3, 10, 30]})
    assert box.sum() == 9 * 28 and box[3, 2] and box[30, 10] and not box[2, 2] and not box[3, 11]
    plain = tmp_path / "plain.dcm"
    synthetic_dicom_xray(plain)
    assert read_xray(str(plain)).exposed is None and exposed_field(read_xray(str(plain))) is None
    with pytest.raises(InputError, match="g.json: exposed_field_px .* does not lie within .* 50 x 40"):
        exposed_field(xray, {"exposed_field_px": [0, 0, 50, 10]}, where="g.json")
    with pytest.raises(InputError, match="exposed_field_px must be"):
        exposed_field(xray, {"exposed_field_px": [0, 0, 5]})
    closed = tmp_path / "closed.dcm"
    synthetic_dicom_xray(closed, ShutterShape="RECTANGULAR", ShutterLeftVerticalEdge="30",
                         ShutterRightVerticalEdge="20", ShutterUpperHorizontalEdge="1", ShutterLowerHorizontalEdge="40")
    with pytest.raises(InputError, match="closed.dcm: its shutters .* leave no pixel exposed"):
        read_xray(str(closed))


def test_simulated_shutters_are_known_and_their_shadow_is_not_compared():
    """``XraySimulator.exposure`` draws as ``xray`` does and says where it shuttered the beam (scatter only
    there); ``prepare_field`` keeps a grid pixel only where all it averages was exposed; the search compares
    neither the shadow nor the pixels next to it."""
    from ACSGRegistrationLib.xray.register import PoseSearch, compared_pixels, prepare_field, prepare_xray
    from ACSGRegistrationLib.xray.simulation import Realism, XraySimulator
    image, _ = bony_phantom()
    labels = sitk.Cast(image > 500, sitk.sitkUInt8) * 7
    simulator = XraySimulator(image, labels, 7)
    carm = CArm(1000.0, (0.8, 0.8), (96, 96))
    truth = look_at([0.0, 0.0, 0.0], 650.0)
    realism = Realism(collimation=1.0, bone_bright=1.0)
    shown, exposed = simulator.exposure(carm, truth, np.random.default_rng(3), realism)
    assert np.array_equal(shown, simulator.xray(carm, truth, np.random.default_rng(3), realism))
    assert 0 < (~exposed).sum() < 0.6 * exposed.size and exposed.shape == shown.shape
    assert shown[~exposed].std() < 0.5 * shown[exposed].std()  # scatter and noise only
    field = prepare_field(exposed, (48, 48))
    pooled = exposed.reshape(48, 2, 48, 2).all(axis=(1, 3))
    assert np.array_equal(field.numpy() == 1, pooled)
    on_grid = prepare_xray(shown, (48, 48))
    compared = compared_pixels(on_grid, field).numpy()
    shadow_and_next = ~np.asarray(torch.nn.functional.max_pool2d(torch.as_tensor(~pooled, dtype=torch.float32)[None],
                                                                 3, 1, 1)[0], dtype=bool)
    assert not (compared * ~shadow_and_next).any() and compared.sum() > 0
    search = PoseSearch(Volume.from_image(image), carm.scaled(2), on_grid, truth, np.zeros(3), field=field)
    assert torch.equal(search.informative, compared_pixels(on_grid, field))


def bony_phantom():
    """A small 'vertebra' (a body, a ring and two bars of different density) in soft tissue, 2 mm voxels."""
    shape = (40, 40, 40)
    k, j, i = np.meshgrid(*[np.arange(n) * 2.0 - 39.0 for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    hu[(i ** 2 + j ** 2 + k ** 2) < 36 ** 2] = 40.0
    hu[((i - 4) ** 2 + (j + 6) ** 2 < 12 ** 2) & (np.abs(k) < 9)] = 700.0
    ring = np.abs(np.sqrt((i + 3) ** 2 + (j - 12) ** 2) - 8) < 2.5
    hu[ring & (np.abs(k - 3) < 6)] = 1100.0
    hu[(np.abs(i - 14) < 3) & (np.abs(k + 10) < 2) & (np.abs(j) < 20)] = 900.0
    image = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(hu.astype(np.float32)), 1.0)
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin((-39.0, -39.0, -39.0))
    mask = (np.abs(i - 4) < 14) & (np.abs(j + 6) < 14) & (np.abs(k) < 10)
    points = np.stack((i[mask], j[mask], k[mask]), axis=1)[::7]
    return image, points


@pytest.mark.parametrize("bone", ["bright", "dark"])
def test_pose_search_recovers_a_known_pose(bone):
    from ACSGRegistrationLib.xray.register import PoseSearch, mean_target_error, prepare_xray, register_pose
    torch.manual_seed(0)
    image, points = bony_phantom()
    carm = CArm(1000.0, (1.6, 1.6), (48, 48))
    truth = look_at([0.0, 0.0, 0.0], 650.0, lao_deg=15.0, cranial_deg=5.0)
    # The X-ray: rendered finer than the registration's DRRs, through Beer-Lambert with Poisson noise.
    line = render(Volume.from_image(image), carm.scaled(0.5), torch.as_tensor(truth, dtype=torch.float32),
                  samples=240).numpy()
    counts = np.random.default_rng(0).poisson(3000 * np.exp(-line)).astype(np.float64)
    xray = -np.log(np.maximum(counts, 1) / 3000) if bone == "bright" else counts  # raw intensities: bone dark
    start_parameters = torch.tensor([0.05, -0.04, 0.03, 6.0, -7.0, 2.0], dtype=torch.float64)
    start = pose_from_parameters(start_parameters, torch.as_tensor(truth), torch.zeros(3, dtype=torch.float64))
    start = start.numpy()
    search = PoseSearch(Volume.from_image(image), carm, prepare_xray(xray, carm.size), start, np.zeros(3))
    result = register_pose(search, "cmaes+gradient", evaluations=300, refine_steps=30)
    assert result["polarity"] == f"bone {bone}"
    before, after = mean_target_error(start, truth, points), mean_target_error(result["ct_to_source"], truth, points)
    # A single view sees depth (along the ray) only through magnification: the search keeps it near the initial
    # pose's (the depth prior), and the start is off mostly across the view.
    assert before > 8.0 and after < 0.4 * before, (before, after)
    assert result["similarity"] > result["initial_similarity"]
    check_pose(result["ct_to_source"], "result")


def phantom_seen_at_a_known_pose(pixels: int = 32):
    """The bony phantom's volume, a C-arm of ``pixels`` a side, the true pose, its noise-free X-ray on the
    registration's grid and the phantom's points."""
    from ACSGRegistrationLib.xray.register import prepare_xray
    image, points = bony_phantom()
    volume = Volume.from_image(image)
    carm = CArm(1000.0, (1.6, 1.6), (pixels, pixels))
    truth = look_at([0.0, 0.0, 0.0], 650.0, lao_deg=15.0, cranial_deg=5.0)
    xray = prepare_xray(render(volume, carm, torch.as_tensor(truth, dtype=torch.float32)).numpy(), carm.size)
    return volume, carm, truth, xray, points


def test_the_search_keeps_the_pose_it_started_from_unless_another_is_preferred():
    """CMA-ES started at the true pose with one population's budget (every candidate off it) must hand back the
    start; and the choice weighs the similarity around the target beside the whole images' (a pose the whole
    images favour slightly but the target's region clearly not loses)."""
    from ACSGRegistrationLib.xray.register import PoseSearch, preferred, register_pose
    volume, carm, truth, xray, points = phantom_seen_at_a_known_pose(48)
    search = PoseSearch(volume, carm, xray, truth, np.zeros(3), target_points=points)
    result = register_pose(search, "cmaes", evaluations=1, restarts=1)
    assert any(h["stage"] == "cma-es" for h in search.history)
    assert np.allclose(result["parameters"], 0.0), result["parameters"]

    def image_similarities(parameters, xray):  # whole images: candidate 0; around the target: 1
        return torch.tensor([0.5, 0.45]), None if search.target_points is None else torch.tensor([0.4, 0.6])
    search.image_similarities = image_similarities
    assert preferred(search, [np.zeros(6), np.zeros(6)]) == 1
    search.target_points = None
    assert preferred(search, [np.zeros(6), np.zeros(6)]) == 0


def test_cmaes_climbs_the_preference_not_the_whole_images_similarity_alone():
    """CMA-ES scores ``PoseSearch.preference`` (whole images plus the target): where the whole images' similarity
    alone peaks elsewhere (as the lateral view's does 15-20 mm along the AP ray of the TotalSegmentator CT), CMA-ES
    goes where the preference peaks."""
    from types import SimpleNamespace
    from ACSGRegistrationLib.xray.register import cma_es
    target, decoy = np.array([0.0, 0.0, 0.0, 1.0, -1.0, 2.0]), np.array([0.0, 0.0, 0.0, 0.0, 0.0, 15.0])

    def peaked_at(where):
        return lambda p, around_target=False: -((p - torch.as_tensor(where, dtype=p.dtype)) ** 2).sum(1)
    fake = SimpleNamespace(volume=SimpleNamespace(mu=torch.zeros(1)), history=[], evaluations=0,
                           similarity=peaked_at(decoy), preference=peaked_at(target))
    found = cma_es(fake, np.zeros(6), evaluations=300, seed=0)
    assert np.linalg.norm(found - target) < 1.0 < np.linalg.norm(found - decoy), found


def test_with_prost_cmaes_starts_from_the_learned_answer_and_from_the_initial_pose(monkeypatch):
    """With a ProST model, CMA-ES's first run starts from the learned descent's answer and the second from the
    initial pose (each run can settle at a neighbouring vertebra; from a single view 10 deg / 20 mm off the learned
    answer alone led it there in 3 of 16 simulated cases); without one, both from the initial pose. The
    refinement goes on from the preferred of the runs' answers and of their starts, each refined."""
    from types import SimpleNamespace
    import ACSGRegistrationLib.xray.register as register
    volume, carm, truth, xray, points = phantom_seen_at_a_known_pose()
    decoy = torch.tensor([8.0, -5.0, 0.0])  # where the fake learned distance leads (source frame)

    def distance(poses):  # the pose's translation pulled 8 mm across, 5 mm up: the descent's answer
        return ((poses[:, :3, 3] - torch.as_tensor(truth[:3, 3], dtype=poses.dtype) - decoy) ** 2).sum(-1)
    learned = SimpleNamespace(volume=volume, distance=distance)
    starts = []

    def recording_cma_es(search, start, evaluations, seed=0, **options):
        starts.append(np.asarray(start, float).copy())
        return np.asarray(start, float) + np.array([0.0, 0.0, 0.0, 0.0, 0.0, 1.0 + seed])
    monkeypatch.setattr(register, "cma_es", recording_cma_es)
    chosen = []

    def preference(search, candidates):  # records what is ranked; prefers the second run's answer (depth 2)
        chosen.append(candidates)
        return -np.abs(np.array([c[5] for c in candidates]) - 2.0)
    monkeypatch.setattr(register, "preference", preference)
    for method, learned_model in (("prost+cmaes+gradient", learned), ("cmaes+gradient", None)):
        starts.clear(), chosen.clear()
        search = register.PoseSearch(volume, carm, xray, truth, np.zeros(3), target_points=points)
        result = register.register_pose(search, method, evaluations=5, refine_steps=1, learned=learned_model)
        assert len(starts) == 2
        if learned_model is not None:
            assert np.allclose(starts[0][3:5], [8.0, -5.0], atol=1.0) and np.allclose(starts[0][[0, 1, 2, 5]], 0)
        else:
            assert np.allclose(starts[0], 0.0)
        assert np.allclose(starts[1], 0.0)
        # ranked: both runs' answers, then the poses they started from (the initial pose once)
        assert len(chosen[0]) == 2 and np.allclose(chosen[0][1], starts[1] + [0, 0, 0, 0, 0, 2.0])
        assert len(chosen[1]) == (2 if learned_model is not None else 1)
        assert abs(result["parameters"][5] - 2.0) < 0.5  # refined (one step) from the second run's answer


def test_the_search_compares_its_best_answer_and_best_start_after_refining_both(monkeypatch):
    """A CMA-ES answer on a wrong peak can outscore, unrefined, the start it would lose to once each has climbed:
    the preferred answer and the preferred start are both refined and the better refined one kept (not the
    refined favourite, nor the two ranked first: both runs here end on wrong peaks that outrank the start)."""
    import ACSGRegistrationLib.xray.register as register
    volume, carm, truth, xray, points = phantom_seen_at_a_known_pose()
    decoy, elsewhere, summit = np.full(6, 0.5), np.full(6, -3.0), np.full(6, 0.05)
    answers = iter([elsewhere, decoy])
    monkeypatch.setattr(register, "cma_es", lambda search, start, evaluations, **options: next(answers))
    scores = {tuple(decoy): 1.2, tuple(elsewhere): 1.1, tuple(np.zeros(6)): 1.0, tuple(summit): 1.5}
    monkeypatch.setattr(register, "preference",
                        lambda search, candidates: np.array([scores[tuple(np.round(c, 6))] for c in candidates]))
    refined = []

    def climb(search, start, steps, **options):  # the start climbs to the summit; the decoy is on its peak
        refined.append(np.asarray(start, float))
        return summit.copy() if np.allclose(start, 0.0) else np.asarray(start, float)
    monkeypatch.setattr(register, "gradient_ascent", climb)
    search = register.PoseSearch(volume, carm, xray, truth, np.zeros(3), target_points=points)
    result = register.register_pose(search, "cmaes+gradient", evaluations=5, refine_steps=3)
    assert len(refined) == 2 and np.allclose(refined[0], decoy) and np.allclose(refined[1], 0.0)
    assert np.allclose(result["parameters"], summit)


def test_a_second_view_pins_down_the_depth_one_view_cannot_see():
    """Two X-rays of the phantom 90 deg apart (AP and lateral), the start 16 mm off along the AP view's ray: the
    AP view alone, its depth prior narrowed to 15 mm (as where the C-arm's distance is known), keeps that depth
    (one view sees depth only through magnification), both views together find it. A second view's poses are the
    C-arm's motion applied to the first's, and the search's similarity is the mean of the two views' (no depth
    prior)."""
    from ACSGRegistrationLib.xray.register import PoseSearch, mean_target_error, prepare_xray, register_pose
    image, points = bony_phantom()
    volume = Volume.from_image(image)
    carm = CArm(1000.0, (1.6, 1.6), (48, 48))
    truths = [look_at([0.0, 0.0, 0.0], 650.0, lao_deg=lao, cranial_deg=5.0) for lao in (15.0, 105.0)]
    motion = truths[1] @ np.linalg.inv(truths[0])  # the C-arm's turn between the shots, known
    xrays = [prepare_xray(render(volume, carm, torch.as_tensor(t, dtype=torch.float32), samples=240).numpy(),
                          carm.size) for t in truths]
    start = pose_from_parameters(torch.tensor([0.02, -0.02, 0.01, 2.0, -2.0, 16.0], dtype=torch.float64),
                                 torch.as_tensor(truths[0]), torch.zeros(3, dtype=torch.float64)).numpy()

    def search(views):
        found = PoseSearch(volume, carm, xrays[0], start, np.zeros(3), target_points=points,
                           depth_prior_mm=15.0)
        if views == 2:
            lateral = found.add_view(carm, xrays[1], motion @ start)
            p = torch.tensor([0.03, 0.0, -0.02, 1.0, 2.0, -3.0])
            assert np.allclose(lateral.pose(torch.zeros(6)).numpy(), motion @ start, atol=1e-4)
            assert torch.allclose(lateral.pose(p), torch.as_tensor(motion, dtype=torch.float32) @ found.pose(p),
                                  atol=1e-3)
            with torch.no_grad():
                both = found.similarity(p[None])
                each = [v.image_similarity(p[None], v.xray) for v in (found, lateral)]
            assert torch.allclose(both, (each[0] + each[1]) / 2, atol=1e-6)
        return register_pose(found, "gradient", refine_steps=60)["ct_to_source"]
    before = mean_target_error(start, truths[0], points)
    one, two = (mean_target_error(search(views), truths[0], points) for views in (1, 2))
    assert before > 15.0 and one > 8.0 and two < 3.0, (before, one, two)


def test_xray_register_command_line(tmp_path, capsys):
    from ACSGRegistrationLib.cli import main
    from ACSGRegistrationLib.xray.register import mean_target_error
    image, points = bony_phantom()
    ct, seg = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    sitk.WriteImage(image, str(ct))
    labels = sitk.Cast(image > 500, sitk.sitkUInt8) * 7
    sitk.WriteImage(labels, str(seg))
    carm = CArm(1000.0, (1.6, 1.6), (48, 48))
    truth = look_at([0.0, 0.0, 0.0], 650.0, lao_deg=15.0, cranial_deg=5.0)
    line = render(Volume.from_image(image), carm, torch.as_tensor(truth, dtype=torch.float32), samples=240).numpy()
    xray = tmp_path / "xray.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(line.astype(np.float32)), str(xray))
    geometry = tmp_path / "geometry.json"
    # The last two columns shuttered: left out of the comparison.
    geometry.write_text(json.dumps({"source_to_detector_mm": 1000.0, "pixel_spacing_mm": [1.6, 1.6],
                                    "exposed_field_px": [0, 0, 45, 47]}))
    start = pose_from_parameters(torch.tensor([0.04, -0.03, 0.02, 5.0, -5.0, 2.0], dtype=torch.float64),
                                 torch.as_tensor(truth), torch.zeros(3, dtype=torch.float64)).numpy()
    init = tmp_path / "init.json"
    init.write_text(json.dumps({"ct_to_source": start.tolist()}))
    out = tmp_path / "out"
    common = ["--ct", str(ct), "--ct-seg", str(seg), "--xray", str(xray), "--init", str(init), "--out", str(out),
              "--evaluations", "200", "--refine-steps", "20", "--detector-pixels", "48"]
    assert main(["xray-register"] + common + ["--geometry", str(geometry), "--depth-prior-mm", "40"]) == 0
    printed = capsys.readouterr().out
    assert "gradient NCC" in printed and "pose.json" in printed
    pose = read_pose(str(out / "pose.json"))
    assert mean_target_error(pose, truth, points) < 0.5 * mean_target_error(start, truth, points)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_similarity"] > metrics["initial_similarity"] and metrics["polarity"] == "bone bright"
    assert "depth prior (0.02 at 40 mm" in metrics["similarity"]
    assert metrics["shutters"] == ["known: their shadow left out"]
    assert sitk.ReadImage(str(out / "drr.nii.gz")).GetSize() == (48, 48, 1)
    placed = json.loads((out / "projections.json").read_text())
    assert list(placed["centroids"]) == ["7"] and len(placed["detector_corners_lps"]) == 4
    assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Refusals name what is wrong, before any work.
    assert main(["xray-register"] + common[:-6] + ["--out", str(tmp_path / "x")]) == 2
    assert "does not give source_to_detector_mm and pixel_spacing_mm" in capsys.readouterr().err
    assert main(["xray-register"] + common + ["--geometry", str(geometry), "--label", "3"]) == 2
    assert "label 3 is not in" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_xray_register_command_line_with_two_views(tmp_path, capsys):
    """``--xray`` and ``--init`` repeated (one ``--geometry`` for both): one CT pose found from both X-rays; the
    second view's files end in _2 and its pose is the first's moved by the C-arm's motion between the shots."""
    from ACSGRegistrationLib.cli import main
    from ACSGRegistrationLib.xray.register import mean_target_error
    image, points = bony_phantom()
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(ct))
    carm = CArm(1000.0, (1.6, 1.6), (48, 48))
    truths = [look_at([0.0, 0.0, 0.0], 650.0, lao_deg=lao) for lao in (0.0, 90.0)]
    motion = truths[1] @ np.linalg.inv(truths[0])
    start = pose_from_parameters(torch.tensor([0.02, -0.02, 0.01, 2.0, -2.0, 14.0], dtype=torch.float64),
                                 torch.as_tensor(truths[0]), torch.zeros(3, dtype=torch.float64)).numpy()
    geometry = tmp_path / "geometry.json"
    geometry.write_text(json.dumps({"source_to_detector_mm": 1000.0, "pixel_spacing_mm": [1.6, 1.6]}))
    views = []
    for number, (truth, initial) in enumerate(zip(truths, (start, motion @ start)), 1):
        line = render(Volume.from_image(image), carm, torch.as_tensor(truth, dtype=torch.float32), samples=240)
        xray, init = tmp_path / f"xray{number}.nii.gz", tmp_path / f"init{number}.json"
        sitk.WriteImage(sitk.GetImageFromArray(line.numpy().astype(np.float32)), str(xray))
        init.write_text(json.dumps({"ct_to_source": initial.tolist()}))
        views.append((str(xray), str(init)))
    out = tmp_path / "out"
    common = ["--ct", str(ct), "--geometry", str(geometry), "--out", str(out), "--method", "gradient",
              "--refine-steps", "40", "--detector-pixels", "48"]
    both = ["--xray", views[0][0], "--init", views[0][1], "--xray", views[1][0], "--init", views[1][1]]
    assert main(["xray-register"] + common + both) == 0
    assert "2 views" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["views"] == 2
    poses = [read_pose(str(out / name)) for name in ("pose.json", "pose_2.json")]
    assert np.allclose(poses[1], motion @ poses[0], atol=1e-4)
    assert mean_target_error(poses[0], truths[0], points) < 2.0 < 12.0 < mean_target_error(start, truths[0], points)
    for name in ("drr_2.nii.gz", "xray_2.nii.gz", "projections_2.json", "overlay_2.png"):
        assert (out / name).is_file(), name
    # One initial pose for two X-rays: refused before any work, saying what is missing.
    assert main(["xray-register"] + common[:4] + ["--out", str(tmp_path / "x")] + both[:6]) == 2
    assert "2 X-ray(s) need as many initial poses" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_pose_and_slicer_transform_round_trip():
    from ACSGRegistrationLib.xray.camera import pose_from_slicer, pose_to_slicer
    pose = look_at([12.0, -40.0, 210.0], 720.0, lao_deg=-25.0, cranial_deg=12.0)
    matrix = pose_to_slicer(pose)
    assert np.abs(pose_from_slicer(matrix) - pose).max() < 1e-6
    lps = np.array([30.0, -15.0, 190.0])
    ras = lps * [-1, -1, 1]
    assert np.allclose(matrix[:3, :3] @ ras + matrix[:3, 3], pose[:3, :3] @ lps + pose[:3, 3], atol=1e-9)


def test_xray_and_drr_are_placed_where_the_detector_stands():
    from ACSGRegistrationLib.xray.camera import detector_corners, detector_image, project_to_detector, \
        source_position
    carm = CArm(1000.0, (0.8, 0.6), (40, 30), (18.0, 16.0))
    pose = look_at([12.0, -40.0, 210.0], 720.0, lao_deg=-25.0, cranial_deg=12.0)
    image = detector_image(np.zeros((30, 40)), carm, pose)
    points = np.array([[12.0, -40.0, 210.0], [30.0, -20.0, 180.0]])
    in_source = points @ pose[:3, :3].T + pose[:3, 3]
    pixels = carm.project(in_source)
    on_detector = project_to_detector(points, carm, pose)
    for (u, v), expected in zip(pixels, on_detector):
        assert np.allclose(image.TransformContinuousIndexToPhysicalPoint((u, v, 0.0)), expected, atol=1e-6)
    # The shadow lies on the line from the source through the point, at the detector's distance.
    source = source_position(pose)
    for point, shadow in zip(points, on_detector):
        direction = (point - source) / np.linalg.norm(point - source)
        assert np.allclose((shadow - source) / np.linalg.norm(shadow - source), direction, atol=1e-9)
    corners = detector_corners(carm, pose)
    assert np.allclose(image.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, 0.0)), corners[0], atol=1e-6)
    assert np.allclose(image.TransformContinuousIndexToPhysicalPoint((39.5, 29.5, 0.0)), corners[2], atol=1e-6)


def test_the_depth_prior_is_what_the_search_subtracts():
    from ACSGRegistrationLib.xray.register import DEPTH_PRIOR_MM, DEPTH_PRIOR_WEIGHT, PoseSearch, gradient_ncc, \
        prepare_xray
    image, _ = bony_phantom()
    carm = CArm(1000.0, (1.6, 1.6), (32, 32))
    truth = look_at([0.0, 0.0, 0.0], 650.0)
    volume = Volume.from_image(image)
    xray = render(volume, carm, torch.as_tensor(truth, dtype=torch.float32)).numpy()
    search = PoseSearch(volume, carm, prepare_xray(xray, carm.size), truth, np.zeros(3))
    parameters = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.01, 0.0, 0.0, 2.0, 0.0, DEPTH_PRIOR_MM]])
    with torch.no_grad():
        plain = gradient_ncc(search.render(parameters), search.xray)
        assert torch.allclose(search.similarity(parameters), plain - torch.tensor([0.0, DEPTH_PRIOR_WEIGHT]))
        # a search's own width (xray-register --depth-prior-mm): four times wider, a sixteenth of the loss
        search.depth_prior_mm = 4 * DEPTH_PRIOR_MM
        assert torch.allclose(search.similarity(parameters), plain - torch.tensor([0.0, DEPTH_PRIOR_WEIGHT / 16]))
    from ACSGRegistrationLib.errors import InputError
    from ACSGRegistrationLib.xray.pipeline import register_files
    with pytest.raises(InputError, match="depth_prior_mm"):
        register_files("ct.nii.gz", "xray.png", "init.json", "out", depth_prior_mm=0.0)


@pytest.mark.parametrize("window", [(0.3, 0.9), (0.5, 0.95)])
def test_the_similarity_leaves_out_the_clipped_pixels_of_a_windowed_xray(window):
    """A radiograph as displayed is windowed: clipped where it is darker or brighter than the window. Those pixels
    have no edges where the DRR has, and the borders of the clipped regions are edges the DRR lacks; compared
    there, gradient NCC along the ray peaks far from the truth (here at the end of the ±30 mm scan), over the
    unclipped pixels at the truth."""
    from ACSGRegistrationLib.xray.register import PoseSearch, compared_pixels, gradient_ncc, prepare_xray
    image, _ = bony_phantom()
    carm = CArm(1000.0, (1.6, 1.6), (64, 64))
    truth = look_at([0.0, 0.0, 0.0], 650.0)
    volume = Volume.from_image(image)
    line = render(volume, carm.scaled(0.5), torch.as_tensor(truth, dtype=torch.float32)).numpy()
    low, high = np.quantile(line[line > 0.2 * line.max()], window)
    shown = np.clip((line - low) / (high - low), 0, 1)
    search = PoseSearch(volume, carm, prepare_xray(shown, carm.size), truth, np.zeros(3))
    mask = compared_pixels(search.given).numpy()
    clipped = (search.given.numpy() <= 0) | (search.given.numpy() >= 1)
    assert 0.1 < mask.mean() < 0.9 and not (mask * clipped).any()
    near_clipped = np.zeros_like(clipped)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            near_clipped |= np.roll(np.roll(clipped, dr, 0), dc, 1)
    assert np.array_equal(mask[1:-1, 1:-1] == 1, ~near_clipped[1:-1, 1:-1])
    offsets = torch.arange(-30.0, 30.1, 1.0)
    parameters = torch.zeros(len(offsets), 6)
    parameters[:, 5] = offsets
    with torch.no_grad():
        unclipped = search.image_similarity(parameters, search.xray)
        every_pixel = gradient_ncc(search.render(parameters), search.xray)
    assert abs(offsets[unclipped.argmax()]) <= 1.0
    assert abs(offsets[every_pixel.argmax()]) >= 10.0
    # an image that is mostly clipped keeps every pixel
    assert compared_pixels(torch.as_tensor((shown > 0.5).astype(np.float32))).min() == 1


def test_the_similarity_around_the_target_changes_continuously_with_the_pose():
    """The target's box follows the pose; a column entering it all at once made the similarity around the target
    jump (131 times its typical change between neighbouring poses 0.02 mm apart, on a noisy X-ray), and the
    refinement's best pose sat at such cliffs. With soft edges its largest step is a few typical ones."""
    from ACSGRegistrationLib.xray.register import PoseSearch, prepare_xray
    image, _ = bony_phantom()
    carm = CArm(1000.0, (1.6, 1.6), (96, 80))
    volume = Volume.from_image(image)
    points = np.random.default_rng(0).uniform(-8, 8, size=(50, 3)) + [3.0, 0.0, 0.0]
    xray = render(volume, carm, torch.as_tensor(look_at([2.0, -1.0, 0.0], 660.0), dtype=torch.float32))
    xray = xray + xray.std() * torch.randn(xray.shape, generator=torch.Generator().manual_seed(0))
    search = PoseSearch(volume, carm, prepare_xray(xray.numpy(), carm.size), look_at([0.0, 0.0, 0.0], 650.0),
                        np.zeros(3), target_points=points)
    parameters = torch.zeros(500, 6)
    parameters[:, 3] = torch.arange(-5.0, 5.0, 0.02)  # the box slides across ~15 columns
    with torch.no_grad():
        values = search.image_similarity(parameters, search.xray, around_target=True)
    steps = (values[1:] - values[:-1]).abs()
    assert steps.max() < 10 * steps.median()


def test_the_per_vertebra_similarity_compares_the_images_over_the_targets_projected_box():
    """``target_region`` is the bounding box of the target's points as ``CArm.project`` places them, widened by the
    margin, its edges soft across one pixel; gradient NCC over a box equals gradient NCC of the images cut to that
    box (one pixel more on each side, for the central differences); the search uses it when asked, and only where
    target points are given."""
    from ACSGRegistrationLib.xray.camera import placed
    from ACSGRegistrationLib.xray.register import TARGET_MARGIN_MM, PoseSearch, gradient_ncc, ncc, prepare_xray, \
        target_region
    image, _ = bony_phantom()
    carm = CArm(1000.0, (1.6, 1.6), (96, 80))
    truth = look_at([0.0, 0.0, 0.0], 650.0)
    volume = Volume.from_image(image)
    points = np.random.default_rng(0).uniform(-8, 8, size=(50, 3)) + [3.0, 0.0, 0.0]
    region = target_region(carm, torch.as_tensor(truth)[None], torch.as_tensor(points), TARGET_MARGIN_MM)[0]
    pixels = carm.project(placed(points, truth))
    margin = TARGET_MARGIN_MM / 1.6
    edges_low, edges_high = pixels.min(0) - margin, pixels.max(0) + margin
    low, high = np.ceil(edges_low + 0.5).astype(int), np.floor(edges_high - 0.5).astype(int)
    assert (low > 1).all() and (high < [94, 78]).all()
    columns, rows = np.arange(96), np.arange(80)
    weights = [np.clip(g - lo + 0.5, 0, 1) * np.clip(hi - g + 0.5, 0, 1)
               for g, lo, hi in ((columns, edges_low[0], edges_high[0]), (rows, edges_low[1], edges_high[1]))]
    assert np.allclose(region.numpy(), weights[1][:, None] * weights[0][None, :], atol=1e-5)
    region = region.numpy()
    assert (region[low[1]:high[1] + 1, low[0]:high[0] + 1] == 1).all() and region.sum() < (region > 0).sum()
    assert region[:low[1] - 1].sum() == 0 and region[:, high[0] + 2:].sum() == 0  # beyond the soft edge: nothing
    region = np.zeros((80, 96), np.float32)  # a 0/1 box: the pixels wholly inside
    region[low[1]:high[1] + 1, low[0]:high[0] + 1] = 1
    region = torch.as_tensor(region)
    a, b = torch.rand(2, 40, 48, dtype=torch.float64)
    assert torch.allclose(ncc(a, b, torch.ones(40, 48)), ncc(a, b))  # over every pixel: plain NCC
    assert torch.allclose(ncc(a, b, torch.full((40, 48), 0.5)), ncc(a, b))  # weights, not an amount of signal
    xray = render(volume, carm, torch.as_tensor(look_at([2.0, -1.0, 0.0], 660.0), dtype=torch.float32))
    drr = render_by_planes(volume, carm, torch.as_tensor(truth, dtype=torch.float32))  # as the search renders
    cut = (slice(low[1] - 1, high[1] + 2), slice(low[0] - 1, high[0] + 2))
    within = gradient_ncc(drr[None], xray, region[None].float())
    assert torch.allclose(within, gradient_ncc(drr[None][:, cut[0], cut[1]], xray[cut]), atol=1e-5)
    search = PoseSearch(volume, carm, prepare_xray(xray.numpy(), carm.size), truth, np.zeros(3), target_points=points)
    with torch.no_grad():
        value = search.image_similarity(torch.zeros(1, 6), search.xray, around_target=True)
        whole = search.image_similarity(torch.zeros(1, 6), search.xray)
    soft = target_region(carm, torch.as_tensor(truth, dtype=torch.float32)[None], torch.as_tensor(points).float(),
                         TARGET_MARGIN_MM)
    assert torch.allclose(value, gradient_ncc(drr[None], search.xray, soft * search.informative), atol=1e-5)
    assert torch.allclose(whole, gradient_ncc(drr[None], search.xray, search.informative), atol=1e-6)
    # what CMA-ES scores and the candidates are ranked by: both, each less the depth prior, from one rendering
    parameters = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.02, -0.01, 0.0, 3.0, -2.0, 12.0]])
    with torch.no_grad():
        both = search.preference(parameters)
        apart = search.similarity(parameters) + search.similarity(parameters, around_target=True)
    assert torch.allclose(both, apart, atol=1e-6) and both[1] < both[0]
