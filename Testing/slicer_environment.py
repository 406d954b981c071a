"""3D Slicer's own Python layer on slicer-core's real MRML, so that ``ACSGRegistration.py`` imports and runs here.

Real, from Slicer's repository (``../shared/slicer-python/<tag>``, read at test time, never copied here):
``slicer.parameterNodeWrapper`` (serializers, validators, GUI connectors), ``slicer.ScriptedLoadableModule``
and ``slicer.i18n`` of v5.10.0 and v5.12.3. Real, from slicer-core: MRML scenes, nodes, logics, displayable
managers and ``slicer.util``.

Stood in for, thinly, because they need the running application: ``qt`` and ``ctk`` (widget classes built from
the names the .ui uses, with properties, children, attributes and signals: what the wrapper's GUI connectors
touch), Slicer's Qt widget classes in the ``slicer`` namespace (``qMRMLNodeComboBox`` ...), and ``slicer.app``
(only ``translate``, which 5.10's i18n calls). Nothing of the module or of the wrapper is stood in for.

``new_scene()`` builds what the Slicer application sets up for a scene: application logic, the built-in colour
nodes, slice view orientation presets; it sets ``slicer.mrmlScene``.
"""

import contextlib
import importlib.util
import inspect
import os
import sys
import types
import xml.etree.ElementTree as ET

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


# -- Qt, thinly ------------------------------------------------------------------------------------------

class Signal:
    """A Qt signal: connect, disconnect, emit (what the GUI connectors and the tests use)."""

    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def disconnect(self, slot):
        self.slots.remove(slot)

    def emit(self, *args):
        """Call each slot with as many of the signal's arguments as it takes (as PythonQt does)."""
        for slot in list(self.slots):
            try:
                parameters = inspect.signature(slot).parameters.values()
            except (TypeError, ValueError):
                slot(*args)
                continue
            if any(p.kind == p.VAR_POSITIONAL for p in parameters):
                slot(*args)
            else:
                slot(*args[:len([p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])])

    def __call__(self, *args, **kwargs):  # a method the connectors call (setCurrentNode, addItem, ...)
        return None


class QWidget:
    """Any Qt widget: properties from the .ui, children, attributes stored as set; any other attribute is a
    signal or a no-op method."""

    def __init__(self, *args, **kwargs):
        self.__dict__["_properties"], self.__dict__["_children"] = {}, []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        signal = Signal()
        self.__dict__[name] = signal
        return signal

    def property(self, name):
        return self._properties.get(name)

    def setProperty(self, name, value):
        self._properties[name] = value

    def findChildren(self, cls=None, name=None):
        found = []
        for child in self._children:
            if cls is None or isinstance(child, cls):
                found.append(child)
            found += child.findChildren(cls)
        return found

    def currentNode(self):  # qMRMLNodeComboBox: the node last set
        return self.__dict__.get("_node")

    def setCurrentNode(self, node):
        self.__dict__["_node"] = node


QT_CLASSES = ("QCheckBox", "QPushButton", "QSlider", "QSpinBox", "QDoubleSpinBox", "QComboBox", "QLineEdit", "QLabel",
              "QTextEdit", "QListWidget", "QProgressBar", "QToolButton", "QRadioButton", "QGroupBox")
CTK_CLASSES = ("ctkCheckBox", "ctkCheckablePushButton", "ctkSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
               "ctkRangeWidget", "ctkPathLineEdit", "ctkDirectoryButton", "ctkColorPickerButton",
               "ctkCollapsibleButton", "ctkComboBox", "ctkDoubleRangeSlider")
SLICER_WIDGET_CLASSES = ("qMRMLNodeComboBox", "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLWidget", "qMRMLTableView",
                         "qMRMLSubjectHierarchyComboBox", "qMRMLRangeWidget", "qSlicerWidget")


def _qt_modules():
    qt = types.ModuleType("qt")
    qt.QWidget = QWidget
    for name in QT_CLASSES:
        setattr(qt, name, type(name, (QWidget,), {}))
    for name in ("QColor", "QObject", "QIcon", "QTimer", "QSettings", "QFormLayout", "QVBoxLayout"):
        setattr(qt, name, type(name, (), {"__init__": lambda self, *a, **k: None}))
    ctk = types.ModuleType("ctk")
    for name in CTK_CLASSES:
        setattr(ctk, name, type(name, (QWidget,), {}))
    return qt, ctk


class _Application:
    """``slicer.app`` as far as the module's import needs it: translation (identity)."""

    @staticmethod
    def translate(context, text):
        return text


def install_qt():
    """The Qt side: ``qt``, ``ctk`` and Slicer's widget classes (once)."""
    if "qt" not in sys.modules:
        sys.modules["qt"], sys.modules["ctk"] = _qt_modules()
        for name in SLICER_WIDGET_CLASSES:
            setattr(slicer, name, type(name, (QWidget,), {}))
        slicer.app = _Application()


def ui_widget_tree(ui_file=UI_FILE):
    """The .ui's widgets as stand-in widgets of their own classes, nested as in the file; the root widget and
    {name: widget}."""
    install_qt()
    qt, ctk = sys.modules["qt"], sys.modules["ctk"]
    named = {}

    def build(element):
        cls = element.get("class")
        widget_class = getattr(qt, cls, None) or getattr(ctk, cls, None) or getattr(slicer, cls, None)
        if widget_class is None:
            raise KeyError(f"{ui_file}: no stand-in for widget class {cls}")
        widget = widget_class()
        widget.setProperty("objectName", element.get("name"))
        bound = element.find("property[@name='SlicerParameterName']/string")
        if bound is not None:
            widget.setProperty("SlicerParameterName", bound.text)
        named[element.get("name")] = widget
        for child in element.iter("widget"):
            if child is not element and _parent_widget(element, child):
                widget._children.append(build(child))
        return widget

    root = build(ET.parse(ui_file).getroot().find("widget"))
    return root, named


def _parent_widget(parent, child):
    """Whether ``parent`` is the nearest widget element above ``child`` (layouts and items in between)."""
    def search(element):
        for sub in element:
            if sub is child:
                return True
            if sub.tag != "widget" and search(sub):
                return True
        return False
    return search(parent)


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
