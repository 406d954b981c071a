"""What the self-test registers: synthetic vertebrae made here (nothing is downloaded) in a scene with two
"patients" on oblique and flipped grids, one with a segmentation node and one with a named labelmap, and a tiny
untrained model that outputs a clear affine and deformation (fast on a CPU)."""

import numpy as np

import slicer

from .conversion import removeNode

def syntheticVertebraArrays(shape=(56, 88, 88), spacing=(1.4, 1.4, 1.6), seed=0, labels=(20, 21)):
    """(CT array in HU, label array) of two stacked vertebra-like shapes (body, arch, spinous and
    transverse processes) in a (k, j, i) volume; index axes are in mm through ``spacing`` (i, j, k)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing[::-1])],
                          indexing="ij")
    x, y, z = i, j, k  # mm; x left-right, y front-back, z head-feet
    ct = np.full(shape, -900.0, dtype=np.float32)
    body = (x / 60.0) ** 2 + (y / 48.0) ** 2 <= 1.0  # soft tissue cylinder
    ct[body] = 20.0
    lab = np.zeros(shape, dtype=np.uint8)
    for n, (value, zc) in enumerate(zip(labels, (17.0, -17.0))):
        scale = 1.0 + rng.uniform(-0.08, 0.08)
        rx, ry, h = 21.0 * scale * rng.uniform(0.95, 1.05), 16.0 * scale, 11.0 * scale
        yc = -6.0 + rng.uniform(-1.5, 1.5)
        xc = rng.uniform(-1.5, 1.5)
        tilt = rng.uniform(-0.08, 0.08)
        zz = z - zc - tilt * y
        vbody = ((x - xc) / rx) ** 2 + ((y - yc) / ry) ** 2 <= 1.0
        vbody &= np.abs(zz) <= h
        r = np.sqrt((x - xc) ** 2 + (y - yc - ry - 9.0) ** 2)
        arch = (np.abs(r - 11.0) <= 3.2) & (y > yc + ry - 4.0) & (np.abs(zz) <= h * 0.6)
        spinous = (np.abs(x - xc) <= 3.0) & (y > yc + ry + 17.0) & (y < yc + ry + 36.0 * scale) \
            & (np.abs(zz + 3.0) <= h * 0.5)
        transverse = (np.abs(x - xc) <= 34.0 * scale) & (np.abs(y - yc - ry - 7.0) <= 3.0) & (np.abs(zz) <= 3.5)
        mask = vbody | arch | spinous | transverse
        lab[mask] = value
        shell = mask & ~(np.abs(zz) <= h - 2.0)
        ct[mask] = 230.0 + 30.0 * n
        ct[shell | arch | spinous | transverse] = 650.0
    ct += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    return ct, lab


def addVolume(array, ijkToRas, name, className="vtkMRMLScalarVolumeNode"):
    node = slicer.mrmlScene.AddNewNodeByClass(className, name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijkToRas, dtype=float)))
    slicer.util.updateVolumeFromArray(node, array)
    node.CreateDefaultDisplayNodes()
    return node


def geometry(spacing, rotationDegrees=0.0, flip=(1, 1, 1), shape=(56, 88, 88), centre=(0.0, 0.0, 0.0)):
    """IJK-to-RAS matrix: axes scaled, flipped and rotated about the superior axis, centred on ``centre``."""
    a = np.deg2rad(rotationDegrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag(np.asarray(flip, float) * np.asarray(spacing, float))
    half = (np.asarray(shape[::-1], float) - 1) / 2.0
    m[:3, 3] = np.asarray(centre, float) - m[:3, :3] @ half
    return m


def createSyntheticScene():
    """Two 'patients': the fixed one with a segmentation node (segments L1, L2) on an oblique grid, the
    moving one with a labelmap (values 20 = L1, 21 = L2) on a flipped grid."""
    shape = (56, 88, 88)
    fixedCt, fixedLab = syntheticVertebraArrays(shape, (1.4, 1.4, 1.6), seed=1)
    movingCt, movingLab = syntheticVertebraArrays(shape, (1.3, 1.5, 1.6), seed=2)
    # The voxel axes of the arrays are x = left-right (R+), y = front-back (A-), z = head-feet (S+).
    fixedGeometry = geometry((1.4, -1.4, 1.6), rotationDegrees=12.0, shape=shape, centre=(10.0, -5.0, 40.0))
    movingGeometry = geometry((-1.3, -1.5, 1.6), flip=(-1, 1, 1), shape=shape, centre=(-30.0, 20.0, -60.0))
    fixedVolume = addVolume(fixedCt, fixedGeometry, "fixed CT")
    movingVolume = addVolume(movingCt, movingGeometry, "moving CT")
    fixedLabelmap = addVolume(fixedLab, fixedGeometry, "fixed labels", "vtkMRMLLabelMapVolumeNode")
    fixedSegmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "fixed segmentation")
    fixedSegmentation.CreateDefaultDisplayNodes()
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(fixedLabelmap, fixedSegmentation)
    seg = fixedSegmentation.GetSegmentation()
    for n, (level, rgb) in enumerate((("L1", (0.95, 0.8, 0.3)), ("L2", (0.45, 0.6, 0.95)))):
        seg.GetNthSegment(n).SetName(level)
        seg.GetNthSegment(n).SetColor(*rgb)
    fixedSegmentation.GetDisplayNode().SetVisibility2DFill(False)  # outlines
    removeNode(fixedLabelmap)
    movingLabelmap = addVolume(movingLab, movingGeometry, "moving labels", "vtkMRMLLabelMapVolumeNode")
    # Named labels, like the colour tables that come with TotalSegmentator's or VerSe's label maps.
    colors = slicer.vtkMRMLColorTableNode()
    colors.SetTypeToUser()
    colors.SetNumberOfColors(22)
    colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for value in range(1, 22):
        colors.SetColor(value, f"label {value}", 0.5, 0.5, 0.5, 1.0)
    colors.SetColor(20, "vertebrae_L1", 0.9, 0.7, 0.3, 1.0)
    colors.SetColor(21, "vertebrae_L2", 0.3, 0.7, 0.9, 1.0)
    colors.SetName("synthetic vertebra labels")
    slicer.mrmlScene.AddNode(colors)
    movingLabelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    return {"fixedVolume": fixedVolume, "movingVolume": movingVolume, "fixedSegmentation": fixedSegmentation,
            "movingSegmentation": movingLabelmap}


def makeTinyModel(path, seed=0):
    """A tiny untrained ACSGRegNet (fast on a CPU) made to output a clear affine and deformation."""
    import torch
    from ACSGRegistrationLib.checkpoint import save_checkpoint
    from ACSGRegistrationLib.config import tiny_config
    from ACSGRegistrationLib.networks import RegistrationNet
    torch.manual_seed(seed)
    cfg = tiny_config("acsgregnet", (16, 32, 32))
    cfg.input_spacing = 4.0  # the paper's 128 x 128 x 64 mm crop on a 32 x 32 x 16 grid
    net = RegistrationNet(cfg)
    with torch.no_grad():
        net.affine.fc.bias.copy_(torch.tensor([[0.97, 0.06, 0.0, 0.8], [-0.06, 0.97, 0.03, -1.0],
                                               [0.0, -0.03, 1.02, 0.5]]).flatten())
        net.deformable.decoder_self.head.weight.normal_(0, 2.5)  # a few mm of smooth deformation
    return save_checkpoint(str(path), net, cfg)
