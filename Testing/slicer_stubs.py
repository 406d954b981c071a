"""Thin stand-ins for the parts of 3D Slicer that the ``slicer-core`` wheel lacks, so that the module file
``ACSGRegistration.py`` imports and its logic runs against slicer-core's real MRML.

Stood in for (nothing else): ``slicer.ScriptedLoadableModule`` (module/widget/logic/test base classes),
``slicer.parameterNodeWrapper`` (a plain attribute holder with the declared defaults; no GUI connection),
and ``slicer.i18n`` (identity translation). The widget (Qt) is not run here. MRML scenes, nodes, logics and
displayable managers are slicer-core's own.

``new_scene()`` builds what the Slicer application sets up for a scene: application logic, the built-in
colour nodes, slice view orientation presets and default slice nodes, and sets ``slicer.mrmlScene``.
"""

import os
import sys
import types
import typing
import unittest

import slicer

_INSTALLED = False
_KEEP = {}


# -- slicer.ScriptedLoadableModule ------------------------------------------------------------------------

class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__

    def resourcePath(self, filename):
        module_dir = os.path.dirname(sys.modules[self.__class__.__module__].__file__)
        return os.path.join(module_dir, "Resources", filename)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = self.__class__.__name__[:-len("Widget")]

    def resourcePath(self, filename):
        module_dir = os.path.dirname(sys.modules[self.__class__.__module__].__file__)
        return os.path.join(module_dir, "Resources", filename)

    def setup(self):
        raise RuntimeError("the module widget needs the Slicer application (Qt)")


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__[:-len("Logic")]

    def getParameterNode(self):
        """The module's singleton parameter node in ``slicer.mrmlScene`` (created when missing)."""
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    messages: typing.List[str] = []

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        ScriptedLoadableModuleTest.messages.append(str(message))

    def takeScreenshot(self, name, description, type=-1):
        pass


# -- slicer.parameterNodeWrapper --------------------------------------------------------------------------

class _Annotation:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class WithinRange(_Annotation):
    pass


class Choice(_Annotation):
    pass


class Decimals(_Annotation):
    pass


class SingleStep(_Annotation):
    pass


class Minimum(_Annotation):
    pass


class Maximum(_Annotation):
    pass


class Default(_Annotation):
    pass


def _implicit_default(annotation):
    base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, Default):
            return meta.args[0]
    return {bool: False, int: 0, float: 0.0, str: ""}.get(base, None)


def parameterNodeWrapper(cls):
    """Keeps the declared parameters as plain attributes (with their defaults) beside the wrapped node."""
    annotations = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: cls.__dict__.get(name, _implicit_default(annotation)) for name, annotation in annotations.items()}

    def __init__(self, parameterNode=None):
        object.__setattr__(self, "parameterNode", parameterNode)
        for name, value in defaults.items():
            object.__setattr__(self, name, value)

    def connectGui(self, *args, **kwargs):
        raise RuntimeError("parameter node GUI connection needs the Slicer application")

    namespace = {"__init__": __init__, "connectGui": connectGui, "disconnectGui": connectGui,
                 "allParameters": property(lambda self: dict((n, getattr(self, n)) for n in defaults)),
                 "__doc__": cls.__doc__, "__annotations__": annotations}
    return type(cls.__name__, (), namespace)


# -- installation -----------------------------------------------------------------------------------------

def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def install():
    """Put the stand-ins into ``sys.modules`` (once); the real slicer-core package stays ``slicer``."""
    global _INSTALLED
    if _INSTALLED:
        return
    scripted = _module("slicer.ScriptedLoadableModule", ScriptedLoadableModule=ScriptedLoadableModule,
                       ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
                       ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
                       ScriptedLoadableModuleTest=ScriptedLoadableModuleTest)
    wrapper = _module("slicer.parameterNodeWrapper", parameterNodeWrapper=parameterNodeWrapper, WithinRange=WithinRange,
                      Choice=Choice, Decimals=Decimals, SingleStep=SingleStep, Minimum=Minimum, Maximum=Maximum,
                      Default=Default)
    i18n = _module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
    for name, module in (("slicer.ScriptedLoadableModule", scripted), ("slicer.parameterNodeWrapper", wrapper),
                         ("slicer.i18n", i18n)):
        sys.modules[name] = module
        setattr(slicer, name.split(".")[1], module)
    _INSTALLED = True


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
    slicer.mrmlScene = scene
    _KEEP[id(scene)] = (scene, app_logic)  # logics live as long as the test session
    return scene


MODULE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ACSGRegistration",
                           "ACSGRegistration.py")


def load_module():
    """Import ACSGRegistration.py (the scripted module) from its file with the stand-ins in place; its backend
    is the installed ``ACSGRegistrationLib`` (in Slicer, the module folder's own copy)."""
    install()
    if "ACSGRegistration" not in sys.modules:
        import importlib.util
        spec = importlib.util.spec_from_file_location("ACSGRegistration", MODULE_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["ACSGRegistration"] = module
        spec.loader.exec_module(module)
    return sys.modules["ACSGRegistration"]


def app_logic(scene):
    """The application logic ``new_scene`` made for ``scene``."""
    return _KEEP[id(scene)][1]
