"""The Slicer application, as far as a scripted module meets it: ``slicer.app`` (event loop with its timers,
message boxes answered as a user would, wait cursor, startup environment, settings, the module manager) and the
main window's module selector, which loads, enters, exits, reloads and unloads a module as Slicer does
(``qSlicerScriptedLoadableModule``: the module class fills the description, the widget is made and set up on
first show, ``enter()``/``exit()`` on each selection; ``parent.reload()`` makes the widget again).

A message box asks ``answers``: the test says, before the click, what the user answers to a question whose text
contains some words; a question nobody answered fails the test (a real user would have been asked), a plain
information or error box is acknowledged with OK and recorded in ``dialogs``.
"""

import importlib.util
import logging
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import qt_standin as qt


class StartupEnvironment:
    """QProcessEnvironment as ``slicer.util.startupEnvironment`` reads it."""

    def __init__(self, values: Dict[str, str]):
        self.values = dict(values)

    def keys(self):
        return list(self.values)

    def value(self, key, default=""):
        return self.values.get(key, default)


class StatusBar:
    def __init__(self):
        self.messages: List[str] = []

    def showMessage(self, message, duration=0):
        self.messages.append(message)


class ModuleManager(qt.QObject):
    moduleAboutToBeUnloaded = qt.Signal("moduleAboutToBeUnloaded(QString)")

    def __init__(self, app):
        super().__init__()
        self.app = app

    def module(self, name):
        return self.app.modules.get(name)


class ModuleSelector:
    def __init__(self, app):
        self.app = app

    def selectModule(self, name):
        self.app.selectModule(name)


class MainWindow(qt.QMainWindow):
    def __init__(self, app):
        super().__init__()
        self.objectName = "qSlicerMainWindow"
        self._selector, self._status = ModuleSelector(app), StatusBar()

    def moduleSelector(self):
        return self._selector

    def statusBar(self):
        return self._status


class ScriptedModuleWidget(qt.qSlicerScriptedLoadableModuleWidget):
    """The C++ side of a scripted module's panel: holds the Python widget (``self()``) and remakes it on reload."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.setLayout(qt.QVBoxLayout())
        self.python = None
        self.isEntered = False

    def self(self):
        return self.python

    def _make(self):
        import slicer
        source = sys.modules[self.module.name]
        self.python = getattr(source, self.module.name + "Widget")(self)
        setattr(slicer.modules, self.module.name + "Widget", self.python)
        self.python.setup()

    def reload(self):
        """qSlicerScriptedLoadableModuleWidget::reload: the widget class of the re-imported file, set up again."""
        self._make()
        if self.isEntered:
            self.python.enter()


class ScriptedModule:
    """qSlicerScriptedLoadableModule: the module's description (filled by its Python class) and its widget."""

    def __init__(self, app, name: str, path: str):
        import slicer
        self.app, self.name, self.path = app, name, path
        self.title = ""
        self._widget = None
        getattr(sys.modules[name], name)(self)  # ScriptedLoadableModule.__init__ fills title, helpText, ...
        setattr(slicer.modules, name.lower(), self)

    def widgetRepresentation(self):
        if self._widget is None:
            self._widget = ScriptedModuleWidget(self)
            self._widget._make()
        return self._widget

    def logic(self):
        return self.widgetRepresentation().self().logic


class Application(qt.QObject):
    """``slicer.app`` for tests."""

    startupCompleted = qt.Signal("startupCompleted()")
    applicationName = "Slicer"
    documentationBaseUrl = "https://slicer.readthedocs.io/en/5.12/"
    majorVersion, minorVersion = 5, 12

    def __init__(self):
        super().__init__()
        self.timers = set()
        self.slotErrors: List[str] = []
        self.dialogs: List[Dict] = []
        self.answers: List[tuple] = []
        self.cursorDepth = 0
        self.testing = False
        self.modules: Dict[str, ScriptedModule] = {}
        self.currentModule: Optional[str] = None
        self.environment = dict(os.environ)
        self.restarts = 0
        self._moduleManager = ModuleManager(self)
        self._mainWindow = MainWindow(self)

    # -- Qt's application --------------------------------------------------------------------------------------
    @staticmethod
    def translate(context, text):
        return text

    def testingEnabled(self) -> bool:
        return self.testing

    def processEvents(self, *args):
        """One turn of the event loop: every timer that is due fires once."""
        now = time.monotonic()
        for timer in sorted(list(self.timers), key=lambda t: t._due or 0):
            if not timer.isActive():
                self.timers.discard(timer)
                continue
            timer._fireIfDue(now)

    def runEventLoop(self, until: Callable[[], bool], timeout: float, interval: float = 0.01) -> float:
        """Turn the event loop until ``until()`` holds; raise after ``timeout`` seconds. Returns the time taken."""
        start = time.monotonic()
        while not until():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"the event loop ran {timeout} s and the condition never held")
            self.processEvents()
            time.sleep(interval)
        return time.monotonic() - start

    def setOverrideCursor(self, cursor):
        self.cursorDepth += 1

    def restoreOverrideCursor(self):
        self.cursorDepth -= 1

    def reportSlotError(self, signal, text):
        logging.error(f"slot of {signal} raised:\n{text}")
        self.slotErrors.append(f"{signal}: {text}")

    def startupEnvironment(self):
        return StartupEnvironment(self.environment)

    def topLevelWidgets(self):
        return [self._mainWindow]

    def mainWindow(self):
        return self._mainWindow

    def layoutManager(self):
        return None

    def userSettings(self):
        return qt.QSettings()

    settings = userSettings

    def moduleManager(self):
        return self._moduleManager

    def moduleDocumentationUrl(self, name):
        return self.documentationBaseUrl + f"user_guide/modules/{name.lower()}.html"

    def restart(self):
        self.restarts += 1

    # -- message boxes -----------------------------------------------------------------------------------------
    def answer(self, containing: str, button: int):
        """The user will answer ``button`` (qt.QMessageBox.Ok, .Cancel, .Yes, ...) to the next question whose
        text contains ``containing``."""
        self.answers.append((containing, button))

    def answerDialog(self, box) -> int:
        text = " ".join(str(t) for t in (box.text, box.informativeText) if t)
        record = {"text": text, "detailedText": box.detailedText, "buttons": box.standardButtons,
                  "icon": box.icon, "windowTitle": box.windowTitle}
        self.dialogs.append(record)
        for k, (containing, button) in enumerate(self.answers):
            if containing in text:
                del self.answers[k]
                record["answer"] = button
                return button
        buttons = box.standardButtons or qt.QMessageBox.Ok
        if buttons in (qt.QMessageBox.Ok, qt.QMessageBox.Close):
            record["answer"] = buttons
            return buttons
        raise AssertionError(f"the user was asked a question the test did not answer: {text!r}")

    # -- modules -----------------------------------------------------------------------------------------------
    def loadModule(self, name: str, path: str) -> ScriptedModule:
        """Import a scripted module's file (as Slicer does at start-up) and register it."""
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.append(directory)
        spec.loader.exec_module(module)
        self.modules[name] = ScriptedModule(self, name, path)
        return self.modules[name]

    def selectModule(self, name: Optional[str]):
        """The module selector: exit the current module's panel, enter the new one's (set up on first show)."""
        if name == self.currentModule:
            return
        if self.currentModule is not None:
            widget = self.modules[self.currentModule].widgetRepresentation()
            widget.isEntered = False
            widget.self().exit()
        self.currentModule = name
        if name is not None:
            widget = self.modules[name].widgetRepresentation()
            widget.isEntered = True
            widget.self().enter()

    def unloadModule(self, name: str):
        """What Slicer does to each module when it quits: moduleAboutToBeUnloaded (the widget's cleanup)."""
        if self.currentModule == name:
            self.selectModule(None)
        self._moduleManager.moduleAboutToBeUnloaded.emit(name)
        self.modules.pop(name, None)
