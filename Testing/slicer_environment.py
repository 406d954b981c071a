"""3D Slicer's own Python layer on slicer-core's real MRML, so that ``ACSGRegistration.py`` imports and runs here.

Real, from Slicer's repository (``../shared/slicer-python/<tag>``, read at test time, never copied here):
``slicer.parameterNodeWrapper`` (serializers, validators, GUI connectors), ``slicer.ScriptedLoadableModule``
and ``slicer.i18n`` of v5.10.0 and v5.12.3. Real, from slicer-core: MRML scenes, nodes, logics, displayable
managers and ``slicer.util``.

Stood in for, because they need the running application: ``qt`` and ``ctk`` (``qt_standin``: Qt's semantics
where the module relies on them, the .ui loaded with every widget and property), Slicer's Qt widget classes in
the ``slicer`` namespace (``qMRMLNodeComboBox`` on the real scene, ...), and ``slicer.app`` with the module
selector (``slicer_app``). Nothing of the module or of the wrapper is stood in for.

``new_scene()`` builds what the Slicer application sets up for a scene: application logic, the built-in colour
nodes, slice view orientation presets; it sets ``slicer.mrmlScene``.
"""

import contextlib
import importlib.util
import os
import sys
import types

import slicer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICER_PYTHON = os.environ.get("ACSG_SLICER_PYTHON", os.path.join(os.path.dirname(ROOT), "shared", "slicer-python"))
VERSIONS = ("v5.10.0", "v5.12.3")
MODULE_FILE = os.path.join(ROOT, "ACSGRegistration", "ACSGRegistration.py")
UI_FILE = os.path.join(ROOT, "ACSGRegistration", "Resources", "UI", "ACSGRegistration.ui")
REAL = ("slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule", "slicer.i18n")
_KEEP = {}


def available(version: str = VERSIONS[-1]) -> bool:
    return os.path.isfile(os.path.join(SLICER_PYTHON, version, "slicer", "parameterNodeWrapper", "__init__.py"))


# -- Qt and the application ---------------------------------------------------------------------------------

def install_qt():
    """The Qt side (once): ``qt`` and ``ctk`` from ``qt_standin``, Slicer's widget classes as ``slicer.q*``, and
    ``slicer.app`` (``slicer_app.Application``)."""
    if "qt" in sys.modules:
        return
    import qt_standin
    import slicer_app
    qt, ctk = types.ModuleType("qt"), types.ModuleType("ctk")
    for cls in qt_standin.QT_CLASSES:
        setattr(qt, cls.__name__, cls)
    for cls in qt_standin.CTK_CLASSES:
        setattr(ctk, cls.__name__, cls)
    for cls in qt_standin.SLICER_CLASSES:
        setattr(slicer, cls.__name__, cls)
    slicer.qSlicerScriptedLoadableModule = slicer_app.ScriptedModule
    qt.QUiLoader = lambda: qt_standin.QUiLoader([qt, ctk, slicer])
    sys.modules["qt"], sys.modules["ctk"] = qt, ctk
    new_application()


def new_application():
    """A fresh ``slicer.app`` (no timers, dialogs, modules) and ``slicer.modules``; settings emptied."""
    import qt_standin
    import slicer_app
    install_qt()
    app = slicer_app.Application()
    qt_standin.APPLICATION = app
    qt_standin.QSettings.STORE.clear()
    slicer.app = app
    slicer.modules = types.SimpleNamespace()
    return app


def ui_widget_tree(ui_file=UI_FILE):
    """The .ui's widgets built by the stand-in QUiLoader: the root widget and {name: widget}."""
    install_qt()
    root = sys.modules["qt"].QUiLoader().load(sys.modules["qt"].QFile(ui_file))
    named = {w.objectName: w for w in root.findChildren() if w.objectName}
    named[root.objectName] = root
    return root, named


# -- Slicer's own Python layer --------------------------------------------------------------------------

def _load(name, path, package=False):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[os.path.dirname(path)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    setattr(slicer, name.split(".")[1], module)
    return module


def install(version: str = VERSIONS[-1]):
    """Slicer's real ``parameterNodeWrapper``, ``ScriptedLoadableModule`` and ``i18n`` of ``version`` as
    ``slicer.*`` (replacing another version's)."""
    install_qt()
    if getattr(slicer, "_acsg_slicer_python", None) == version:
        return
    for name in [n for n in sys.modules if n.split(".")[0] == "slicer" and ".".join(n.split(".")[:2]) in REAL]:
        del sys.modules[name]
    base = os.path.join(SLICER_PYTHON, version, "slicer")
    _load("slicer.i18n", os.path.join(base, "i18n.py"))
    _load("slicer.parameterNodeWrapper", os.path.join(base, "parameterNodeWrapper", "__init__.py"), package=True)
    _load("slicer.ScriptedLoadableModule", os.path.join(base, "ScriptedLoadableModule.py"))
    slicer._acsg_slicer_python = version


def load_module(version: str = VERSIONS[-1], fresh: bool = False):
    """ACSGRegistration.py imported from its file on Slicer's Python layer of ``version``; its helpers from the
    module folder and its backend the installed ``ACSGRegistrationLib``. ``fresh``: a new copy, not the one
    in ``sys.modules`` (to build its classes under another version)."""
    install(version)
    module_dir = os.path.dirname(MODULE_FILE)
    if module_dir not in sys.path:
        sys.path.append(module_dir)  # after site-packages: the installed backend is the one under test
    if fresh or "ACSGRegistration" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ACSGRegistration", MODULE_FILE)
        module = importlib.util.module_from_spec(spec)
        if not fresh:
            sys.modules["ACSGRegistration"] = module
        spec.loader.exec_module(module)
        return module
    return sys.modules["ACSGRegistration"]


@contextlib.contextmanager
def slicer_version(version: str):
    """Slicer's Python layer of ``version`` inside the block, the default one again after it."""
    previous = getattr(slicer, "_acsg_slicer_python", None)
    try:
        install(version)
        yield
    finally:
        if previous and previous != version:
            install(previous)


def new_scene():
    """A scene set up like the application's: colour nodes, slice presets and logics; ``slicer.mrmlScene``."""
    import vtk
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    # Registered by the Colors module's logic in the application.
    scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    # Registered by the Segmentations module at the application's start: labelmap <-> surface conversions.
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    slicer.mrmlScene = scene
    _KEEP[id(scene)] = (scene, app_logic)  # logics live as long as the test session
    return scene


def app_logic(scene):
    """The application logic ``new_scene`` made for ``scene``."""
    return _KEEP[id(scene)][1]
