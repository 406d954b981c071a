"""MRML nodes <-> SimpleITK images and ITK transforms, through the nodes' IJK-to-RAS matrices.

SimpleITK and ITK work in LPS, Slicer in RAS: every conversion flips the first two axes. Nothing here modifies
an input node.
"""

import os

import numpy as np
import vtk

import slicer

from ACSGRegistrationLib.errors import InputError
from ACSGRegistrationLib.geometry import LPS_TO_RAS, ijk_to_physical_matrix


def ijkToRasOfNode(volumeNode, world: bool = True) -> np.ndarray:
    """The volume's IJK-to-RAS matrix (4x4), including linear parent transforms when ``world``."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    m = slicer.util.arrayFromVTKMatrix(matrix)
    parent = volumeNode.GetParentTransformNode()
    if world and parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"'{volumeNode.GetName()}' is under the non-linear transform '{parent.GetName()}': "
                             "harden the transform first (Data module: right-click, Harden transform)")
        toWorld = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(toWorld)
        m = slicer.util.arrayFromVTKMatrix(toWorld) @ m
    return m


def imageGeometryFromIJKToRAS(ijkToRas: np.ndarray):
    """(spacing, direction 3x3, origin) in SimpleITK's LPS convention from an IJK-to-RAS matrix."""
    lps = LPS_TO_RAS @ np.asarray(ijkToRas, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError("the volume has a degenerate IJK-to-RAS matrix (zero spacing)")
    direction = lps[:3, :3] / spacing
    return spacing, direction, lps[:3, 3].copy()


def ijkToRasFromImage(image) -> np.ndarray:
    """IJK-to-RAS matrix (4x4) of a SimpleITK image (whose geometry is LPS)."""
    return LPS_TO_RAS @ ijk_to_physical_matrix(image)


def volumeNodeToImage(volumeNode, dtype=None):
    """A SimpleITK image (LPS geometry) with a copy of the volume's voxels; the node is not modified."""
    import SimpleITK as sitk
    if volumeNode is None or volumeNode.GetImageData() is None:
        name = volumeNode.GetName() if volumeNode is not None else "volume"
        raise InputError(f"'{name}' has no image data")
    if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError(f"'{volumeNode.GetName()}' has {volumeNode.GetImageData().GetNumberOfScalarComponents()} "
                         "components per voxel; a scalar volume is needed")
    array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    if dtype is not None:
        array = array.astype(dtype)
    spacing, direction, origin = imageGeometryFromIJKToRAS(ijkToRasOfNode(volumeNode))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in direction.ravel()])
    image.SetOrigin([float(o) for o in origin])
    return image


def updateVolumeNodeFromImage(volumeNode, image):
    """Put a SimpleITK image's voxels and geometry into a volume node (world geometry, no parent transform)."""
    import SimpleITK as sitk
    array = sitk.GetArrayFromImage(image)
    if volumeNode.GetParentTransformNode() is not None:
        volumeNode.SetAndObserveTransformNodeID(None)
    slicer.util.updateVolumeFromArray(volumeNode, array)
    volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRasFromImage(image)))
    return volumeNode


def gridTransformFromField(displacementField):
    """A ``vtkOrientedGridTransform`` (RAS) from an ITK displacement field (mm, LPS vectors and geometry).

    Used as the transform *from parent* of a grid transform node: a fixed-space point p goes to the moving-space
    point p + u(p), ITK's resampling convention, so that the moving volume placed under the node is displayed
    (and resampled) in the fixed volume's space.
    """
    import SimpleITK as sitk
    from vtk.util import numpy_support
    u = sitk.GetArrayFromImage(displacementField).astype(np.float64)  # (k, j, i, 3), LPS
    if u.ndim != 4 or u.shape[-1] != 3:
        raise ValueError(f"expected a 3D displacement field with 3 components, got an array of shape {u.shape}")
    u[..., 0] *= -1.0  # L -> R
    u[..., 1] *= -1.0  # P -> A
    ijkToRas = ijkToRasFromImage(displacementField)
    spacing = np.linalg.norm(ijkToRas[:3, :3], axis=0)
    direction = np.eye(4)
    direction[:3, :3] = ijkToRas[:3, :3] / spacing
    grid = vtk.vtkImageData()
    grid.SetOrigin(*ijkToRas[:3, 3])
    grid.SetSpacing(*spacing)
    grid.SetDimensions(*displacementField.GetSize())
    vectors = numpy_support.numpy_to_vtk(np.ascontiguousarray(u.reshape(-1, 3)), deep=True,
                                         array_type=vtk.VTK_DOUBLE)
    vectors.SetName("displacement")
    grid.GetPointData().SetScalars(vectors)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetGridDirectionMatrix(slicer.util.vtkMatrixFromArray(direction))
    transform.SetDisplacementGridData(grid)
    transform.SetInterpolationModeToLinear()
    return transform


def compositeTransformFromResult(result):
    """The registration's whole map as one VTK transform (RAS; transform from parent, fixed -> moving): the
    deformable part first (a grid on the fixed crop, falling to zero in a band beyond it), then the affine.
    The same map as the backend's ``forward_transform.h5`` everywhere: the full map inside the crop, the affine
    outside it (a displacement grid alone would be continued by Slicer beyond its edge)."""
    linear = vtk.vtkTransform()
    linear.SetMatrix(slicer.util.vtkMatrixFromArray(LPS_TO_RAS @ np.asarray(result.affine_lps) @ LPS_TO_RAS))
    composite = vtk.vtkGeneralTransform()  # pre-multiplying: the transform concatenated last is applied first
    composite.Concatenate(linear)
    composite.Concatenate(gridTransformFromField(result.exported_deformable_field()))
    return composite


#
# Results
#



def removeNode(node):
    """Remove a node with its display and storage nodes (nothing when it is already gone)."""
    if node is None or node.GetScene() is None:
        return
    scene = node.GetScene()
    if node.IsA("vtkMRMLDisplayableNode"):
        for i in range(node.GetNumberOfDisplayNodes()):
            display = node.GetNthDisplayNode(i)
            if display is not None:
                scene.RemoveNode(display)
    storage = node.GetStorageNode() if node.IsA("vtkMRMLStorableNode") else None
    if storage is not None:
        scene.RemoveNode(storage)
    scene.RemoveNode(node)


def loadVolumeFile(path: str, labelmap: bool = False, name=None, scene=None):
    """A volume node from an image file (read by the backend's rules, SimpleITK; LPS -> RAS)."""
    from ACSGRegistrationLib.io import read_image
    scene = scene or slicer.mrmlScene
    image = read_image(path, "label map" if labelmap else "image")
    className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    base = name or os.path.basename(path).split(".")[0]
    node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(base))
    updateVolumeNodeFromImage(node, image)
    node.CreateDefaultDisplayNodes()
    return node
