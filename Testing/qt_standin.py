"""Qt, as far as the module relies on it, for tests that drive the real panel code without the Slicer application.

What it keeps of Qt (and PythonQt, through which Slicer's Python sees Qt):
- a signal calls its slots in connection order, synchronously and re-entrantly (a slot may set another widget,
  whose signals run to their end before the first signal's next slot); a slot disconnected during an emission is
  not called by it; ``blockSignals`` silences an object; a Python slot gets as many of the signal's arguments as
  it takes; an exception in a slot is reported (``Application.slotErrors``) and the emission goes on, as PythonQt
  prints it and goes on;
- setters emit their notify signal only when the value changes, in Qt's order (an editable combo box sets its
  line edit's text, which emits ``editTextChanged`` and ``currentTextChanged``, before ``currentIndexChanged``);
  spin boxes and ctk sliders clamp to their range and round to their decimals; a progress bar ignores values out
  of its range; ``QAbstractButton.click`` does nothing on a disabled button and toggles a checkable one;
- ``qMRMLNodeComboBox`` lists the scene's nodes of its types (exact classes unless ``showChildNodeTypes``, hidden
  nodes left out), follows the scene (a removed current node gives way to the node now at its row, as QComboBox
  does; with ``noneEnabled`` off the first node added becomes current), and emits ``currentNodeChanged`` only
  on change;
- ``QUiLoader`` builds the widgets of a .ui file with every property it sets (an unknown property is an error, as
  is an unknown widget class or signal) and its signal/slot connections;
- ``QTimer`` fires from ``Application.processEvents`` once its interval has passed (real time: background runs are
  real processes); ``QSettings`` stores values for the test session.

Nothing here imports Slicer: ``slicer_environment`` installs these classes as ``qt``/``ctk``/``slicer.q*``.
"""

import inspect
import re
import time
import traceback
import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, List, Optional

APPLICATION = None  # the Application instance (set by slicer_environment): timers and slot errors go there


# -- signals ----------------------------------------------------------------------------------------------

def _normalised(signature: str) -> str:
    """'currentNodeChanged(vtkMRMLNode *)' -> 'currentNodeChanged(vtkMRMLNode*)'; 'const QString&' -> 'QString'."""
    signature = re.sub(r"\bconst\s+", "", signature.replace(" ", ""))
    return signature.replace("&", "")


def _arity(slot) -> Optional[int]:
    """How many positional arguments a Python callable takes (None: any number)."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return None
    return len([p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])


class BoundSignal:
    """One signal of one object: its slots in connection order."""

    def __init__(self, owner, signature: str):
        self.owner, self.signature = owner, signature
        self.slots: List[Callable] = []

    def connect(self, slot) -> bool:
        if not callable(slot):
            raise TypeError(f"{self.signature}: slot {slot!r} is not callable")
        self.slots.append(slot)
        return True

    def disconnect(self, slot=None) -> bool:
        if slot is None:
            self.slots.clear()
            return True
        for k, connected in enumerate(self.slots):
            if connected == slot:
                del self.slots[k]
                return True
        return False

    def emit(self, *args) -> None:
        if self.owner.signalsBlocked():
            return
        for slot in list(self.slots):
            if not any(s is slot for s in self.slots):  # disconnected by an earlier slot of this emission
                continue
            n = _arity(slot)
            try:
                slot(*(args if n is None else args[:n]))
            except Exception:  # PythonQt prints it and goes on with the next slot
                if APPLICATION is None:
                    raise
                APPLICATION.reportSlotError(self.signature, traceback.format_exc())

    __call__ = emit  # a signal connected to a signal


class Signal:
    """A signal declared on a class; overloads share the name (the attribute is the first one, as in PythonQt)."""

    def __init__(self, *signatures: str):
        self.signatures = tuple(_normalised(s) for s in signatures)

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj._signal(self.signatures[0])


def _declared_signals(cls) -> Dict[str, str]:
    found = {}
    for klass in reversed(cls.__mro__):
        for value in vars(klass).values():
            if isinstance(value, Signal):
                for signature in value.signatures:
                    found[signature] = signature
    return found


# -- properties ---------------------------------------------------------------------------------------------

class Property:
    """A Qt property: ``widget.name`` reads it, ``widget.name = v`` and ``widget.setName(v)`` write it; the write
    normalises the value (``normalise(widget, value)``) and calls ``changed(widget, old, new)`` on change only."""

    def __init__(self, default=None, normalise=None, changed=None, readonly=False):
        self.default, self.normalise, self.changed, self.readonly = default, normalise, changed, readonly

    def __set_name__(self, owner, name):
        self.name = name
        setter = "set" + name[0].upper() + name[1:]
        if not hasattr(owner, setter):
            setattr(owner, setter, lambda obj, value, _p=self: _p.__set__(obj, value))

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj._values.get(self.name, self.default)

    def __set__(self, obj, value):
        if self.readonly:
            raise AttributeError(f"{type(obj).__name__}.{self.name} is read-only")
        if self.normalise is not None:
            value = self.normalise(obj, value)
        old = obj._values.get(self.name, self.default)
        obj._values[self.name] = value
        if self.changed is not None and old != value:
            self.changed(obj, old, value)


def _notify(*signal_names):
    """A ``changed`` hook that emits these signals with the new value."""
    def changed(obj, old, new):
        for name in signal_names:
            getattr(obj, name).emit(new)
    return changed


def _qt_properties(cls) -> Dict[str, Any]:
    """The Qt properties of a class: ``Property`` fields and the Python properties that stand for computed ones
    (``enabled``, ``visible``, ``currentIndex``, ...)."""
    found = {}
    for klass in reversed(cls.__mro__):
        for key, value in vars(klass).items():
            if isinstance(value, (Property, property)) and not key.startswith("_"):
                found[key] = value
    return found


# -- objects and widgets ------------------------------------------------------------------------------------

class QObject:
    destroyed = Signal("destroyed(QObject*)")
    objectNameChanged = Signal("objectNameChanged(QString)")
    objectName = Property("", changed=_notify("objectNameChanged"))

    def __init__(self, parent=None, *args, **kwargs):
        self.__dict__["_values"] = {}
        self._signals: Dict[str, BoundSignal] = {}
        self._dynamic: Dict[str, Any] = {}
        self._children: List["QObject"] = []
        self._parent = None
        self._blocked = False
        if isinstance(parent, QObject):
            self.setParent(parent)

    # PythonQt exposes objectName as ``name`` too (slicer.util.childWidgetVariables reads it).
    @property
    def name(self):
        return self.objectName

    @name.setter
    def name(self, value):
        self.objectName = value

    def _signal(self, signature: str) -> BoundSignal:
        bound = self._signals.get(signature)
        if bound is None:
            bound = self._signals[signature] = BoundSignal(self, signature)
        return bound

    def _find_signal(self, signature: str) -> BoundSignal:
        signature = _normalised(signature)
        declared = _declared_signals(type(self))
        if signature in declared:
            return self._signal(signature)
        name = signature.split("(")[0]
        if signature.endswith("()"):  # a signal with default arguments: clicked() is clicked(bool)
            overloads = [s for s in declared if s.split("(")[0] == name]
            if len(overloads) == 1:
                return self._signal(overloads[0])
        raise AttributeError(f"{type(self).__name__} has no signal {signature} (it has: "
                             f"{', '.join(sorted(declared)) or 'none'})")

    def connect(self, signal, slot) -> bool:
        """PythonQt's ``obj.connect("signal(args)", slot)``."""
        return self._find_signal(signal).connect(slot)

    def disconnect(self, signal, slot=None) -> bool:
        return self._find_signal(signal).disconnect(slot)

    def blockSignals(self, block: bool) -> bool:
        previous, self._blocked = self._blocked, bool(block)
        return previous

    def signalsBlocked(self) -> bool:
        return self._blocked

    def parent(self):
        return self._parent

    def setParent(self, parent):
        if self._parent is not None and self in self._parent._children:
            self._parent._children.remove(self)
        self._parent = parent
        if parent is not None:
            parent._children.append(self)

    def children(self) -> list:
        return list(self._children)

    def findChildren(self, cls=None, name=None) -> list:
        found = []
        for child in self._children:
            if (cls is None or isinstance(child, cls)) and (name is None or child.objectName == name):
                found.append(child)
            found += child.findChildren(cls, name)
        return found

    def findChild(self, cls=None, name=None):
        found = self.findChildren(cls, name)
        return found[0] if found else None

    def property(self, name: str):
        declared = _qt_properties(type(self))
        if name in declared:
            return getattr(self, name)
        return self._dynamic.get(name)

    def setProperty(self, name: str, value) -> bool:
        if name in _qt_properties(type(self)):
            setattr(self, name, value)
            return True
        self._dynamic[name] = value
        return False

    def className(self) -> str:
        return type(self).__name__

    def isWidgetType(self) -> bool:
        return False

    def deleteLater(self):
        pass

    def __repr__(self):
        return f"<{type(self).__name__} {self.objectName!r}>"


class QLayoutItem:
    def __init__(self, widget=None, layout=None):
        self._widget, self._layout = widget, layout

    def widget(self):
        return self._widget

    def layout(self):
        return self._layout


class QLayout(QObject):
    leftMargin = Property(0)
    topMargin = Property(0)
    rightMargin = Property(0)
    bottomMargin = Property(0)
    spacing = Property(6)

    def __init__(self, parent=None, *args):
        super().__init__(None)
        self._items: List[QLayoutItem] = []
        self._owner = None
        if isinstance(parent, QWidget):
            parent.setLayout(self)

    def _adopt(self, widget):
        if self._owner is not None and widget.parent() is not self._owner:
            widget.setParent(self._owner)

    def addWidget(self, widget, *args, **kwargs):
        self._items.append(QLayoutItem(widget=widget))
        self._adopt(widget)

    def addLayout(self, layout, *args, **kwargs):
        self._items.append(QLayoutItem(layout=layout))
        if self._owner is not None:
            layout._attach(self._owner)

    def addRow(self, *items):
        for item in items:
            if isinstance(item, QLayout):
                self.addLayout(item)
            elif isinstance(item, QWidget):
                self.addWidget(item)
            elif isinstance(item, str):
                self.addWidget(QLabel(item))

    def addItem(self, item):
        self._items.append(item)

    def addStretch(self, *args):
        pass

    def addSpacing(self, *args):
        pass

    def _attach(self, owner):
        self._owner = owner
        for item in self._items:
            if item.widget() is not None:
                self._adopt(item.widget())
            elif item.layout() is not None:
                item.layout()._attach(owner)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, index):
        return self._items[index] if 0 <= index < len(self._items) else None

    def removeItem(self, item):
        self._items = [i for i in self._items if i is not item]

    def removeWidget(self, widget):
        self._items = [i for i in self._items if i.widget() is not widget]

    def setContentsMargins(self, *margins):
        self.leftMargin, self.topMargin, self.rightMargin, self.bottomMargin = margins


QVBoxLayout, QHBoxLayout, QFormLayout, QGridLayout = (type(name, (QLayout,), {}) for name in
                                                      ("QVBoxLayout", "QHBoxLayout", "QFormLayout", "QGridLayout"))


class QWidget(QObject):
    customContextMenuRequested = Signal("customContextMenuRequested(QPoint)")
    windowTitleChanged = Signal("windowTitleChanged(QString)")
    toolTip = Property("")
    statusTip = Property("")
    whatsThis = Property("")
    styleSheet = Property("")
    windowTitle = Property("", changed=_notify("windowTitleChanged"))
    geometry = Property(None)
    sizePolicy = Property(None)
    minimumSize = Property(None)
    maximumSize = Property(None)
    font = Property(None)
    focusPolicy = Property(None)
    accessibleName = Property("")

    def __init__(self, parent=None, *args, **kwargs):
        super().__init__(parent)
        self._explicitlyDisabled = False
        self._hidden = False
        self._layout = None

    def isWidgetType(self) -> bool:
        return True

    # enabled: a widget is enabled when it and every ancestor is (Qt's isEnabled); visible: shown, and every
    # ancestor shown (a collapsed ctkCollapsibleButton hides its contents).
    enabled = property(lambda self: self.isEnabled(), lambda self, value: self.setEnabled(value))
    visible = property(lambda self: self.isVisible(), lambda self, value: self.setVisible(value))

    def setEnabled(self, value):
        self._explicitlyDisabled = not bool(value)

    def setDisabled(self, value):
        self.setEnabled(not value)

    def isEnabled(self) -> bool:
        widget = self
        while widget is not None:
            if isinstance(widget, QWidget) and widget._explicitlyDisabled:
                return False
            widget = widget.parent()
        return True

    def setVisible(self, value):
        self._hidden = not bool(value)

    def show(self):
        self.setVisible(True)

    def hide(self):
        self.setVisible(False)

    def isHidden(self) -> bool:
        return self._hidden

    def isVisible(self) -> bool:
        widget, child = self, None
        while widget is not None:
            if isinstance(widget, QWidget) and widget._hidden:
                return False
            if child is not None and getattr(widget, "collapsed", False) and isinstance(widget, ctkCollapsibleButton):
                return False
            widget, child = widget.parent(), widget
        return True

    def layout(self):
        return self._layout

    def setLayout(self, layout):
        self._layout = layout
        layout.setParent(self)
        layout._attach(self)

    def update(self):
        pass

    def repaint(self):
        pass

    def setFocus(self, *args):
        pass

    def setSizePolicy(self, *args):
        self.sizePolicy = args

    def setToolTip(self, text):
        self.toolTip = text


QFrame, QMainWindow = (type(name, (QWidget,), {}) for name in ("QFrame", "QMainWindow"))


class QDialog(QWidget):
    accepted = Signal("accepted()")
    rejected = Signal("rejected()")
    finished = Signal("finished(int)")

    def exec_(self):
        return 0

    exec = exec_

    def close(self):
        self.hide()


class _TextWidget(QWidget):
    """A widget made with its text (``QLabel("text", parent)``, or just a parent)."""

    def __init__(self, text="", parent=None, *args):
        if isinstance(text, QObject):
            text, parent = "", text
        super().__init__(parent)
        self.text = text


class QLabel(_TextWidget):
    linkActivated = Signal("linkActivated(QString)")
    text = Property("")
    wordWrap = Property(False)
    openExternalLinks = Property(False)
    textFormat = Property(None)
    alignment = Property(None)
    textInteractionFlags = Property(None)


class QAbstractButton(_TextWidget):
    clicked = Signal("clicked(bool)")
    pressed = Signal("pressed()")
    released = Signal("released()")
    toggled = Signal("toggled(bool)")
    text = Property("")
    icon = Property(None)
    checkable = Property(False)
    checked = Property(False, normalise=lambda b, v: bool(v) and b.checkable,
                       changed=lambda b, old, new: b._checkedChanged(new))


    def _checkedChanged(self, checked):
        self.toggled.emit(checked)

    def isChecked(self) -> bool:
        return self.checked

    def click(self):
        """Qt's click(): nothing on a disabled button; a checkable one toggles, then ``clicked(checked)``."""
        if not self.isEnabled():
            return
        self.pressed.emit()
        if self.checkable:
            self.checked = not self.checked
        self.released.emit()
        self.clicked.emit(self.checked)

    def animateClick(self, *args):
        self.click()

    def toggle(self):
        if self.checkable:
            self.checked = not self.checked


class QPushButton(QAbstractButton):
    default = Property(False)
    autoDefault = Property(False)
    flat = Property(False)


class QToolButton(QAbstractButton):
    pass


class QRadioButton(QAbstractButton):
    def __init__(self, *args):
        super().__init__(*args)
        self.checkable = True


class QCheckBox(QAbstractButton):
    stateChanged = Signal("stateChanged(int)")
    tristate = Property(False)

    def __init__(self, *args):
        super().__init__(*args)
        self.checkable = True

    def _checkedChanged(self, checked):
        self.stateChanged.emit(2 if checked else 0)  # Qt::Checked / Qt::Unchecked, before toggled
        self.toggled.emit(checked)

    def checkState(self) -> int:
        return 2 if self.checked else 0


class QGroupBox(QWidget):
    title = Property("")
    checkable = Property(False)
    checked = Property(True)


class QLineEdit(_TextWidget):
    textChanged = Signal("textChanged(QString)")
    textEdited = Signal("textEdited(QString)")
    returnPressed = Signal("returnPressed()")
    editingFinished = Signal("editingFinished()")
    text = Property("", normalise=lambda w, v: "" if v is None else str(v), changed=_notify("textChanged"))
    placeholderText = Property("")
    readOnly = Property(False)
    clearButtonEnabled = Property(False)


    def clear(self):
        self.text = ""

    def userTypes(self, text: str):
        """A user typing ``text`` at the end, one character at a time (``textEdited`` and ``textChanged`` each)."""
        for character in text:
            self._values["text"] = self.text + character
            self.textEdited.emit(self.text)
            self.textChanged.emit(self.text)


class QPlainTextEdit(QWidget):
    textChanged = Signal("textChanged()")
    readOnly = Property(False)
    plainText = Property("", changed=lambda w, old, new: w.textChanged.emit())
    maximumBlockCount = Property(0)
    lineWrapMode = Property(None)
    placeholderText = Property("")

    def toPlainText(self) -> str:
        return self.plainText

    def setPlainText(self, text):
        self.plainText = text

    def appendPlainText(self, text):
        lines = (self.plainText.split("\n") if self.plainText else []) + str(text).split("\n")
        if self.maximumBlockCount:
            lines = lines[-self.maximumBlockCount:]
        self.plainText = "\n".join(lines)

    def clear(self):
        self.plainText = ""

    def moveCursor(self, *args):
        pass

    def ensureCursorVisible(self):
        pass


class QTextEdit(QPlainTextEdit):
    acceptRichText = Property(True)

    def append(self, text):
        """A new paragraph at the end (plain text here; Qt takes text that starts like a tag as rich text)."""
        self.appendPlainText(text)


def _clamped(low_name, high_name, decimals_name=None, integer=False):
    def normalise(widget, value):
        value = float(value)
        low, high = getattr(widget, low_name), getattr(widget, high_name)
        value = min(max(value, low), high)
        if decimals_name is not None:
            value = round(value, int(getattr(widget, decimals_name)))
        return int(round(value)) if integer else value
    return normalise


def _range_changed(widget, old, new):
    widget.value = widget.value  # clamp to the new range (emits valueChanged when that moves it)


class QSpinBox(QWidget):
    valueChanged = Signal("valueChanged(int)")
    textChanged = Signal("textChanged(QString)")
    minimum = Property(0, normalise=lambda w, v: int(v), changed=_range_changed)
    maximum = Property(99, normalise=lambda w, v: int(v), changed=_range_changed)
    singleStep = Property(1)
    suffix = Property("")
    prefix = Property("")
    value = Property(0, normalise=_clamped("minimum", "maximum", integer=True), changed=_notify("valueChanged"))

    def setRange(self, low, high):
        self.minimum, self.maximum = low, max(low, high)


class _RealValueWidget(QWidget):
    """What a double spin box and a ctk slider share: a value clamped to the range and rounded to ``decimals``
    (2 unless set), ``valueChanged(double)`` on change."""

    valueChanged = Signal("valueChanged(double)")
    minimum = Property(0.0, normalise=lambda w, v: float(v), changed=_range_changed)
    maximum = Property(99.99, normalise=lambda w, v: float(v), changed=_range_changed)
    decimals = Property(2, normalise=lambda w, v: int(v), changed=_range_changed)
    singleStep = Property(1.0)
    suffix = Property("")
    prefix = Property("")
    value = Property(0.0, normalise=_clamped("minimum", "maximum", "decimals"), changed=_notify("valueChanged"))

    def setRange(self, low, high):
        self.minimum, self.maximum = low, max(low, high)

    def userTypes(self, text: str):
        """A user typing a number and pressing Enter: the value as the spin box takes it (rounded, clamped)."""
        self.value = float(text)


class QDoubleSpinBox(_RealValueWidget):
    textChanged = Signal("textChanged(QString)")


class QSlider(QSpinBox):
    pass


class QProgressBar(QWidget):
    valueChanged = Signal("valueChanged(int)")
    minimum = Property(0, normalise=lambda w, v: int(v))
    maximum = Property(100, normalise=lambda w, v: int(v))
    format = Property("%p%")
    textVisible = Property(True)
    orientation = Property(None)

    @property
    def value(self) -> int:
        return self._values.get("value", self.minimum - 1)

    @value.setter
    def value(self, value):
        """QProgressBar::setValue: a value out of the range is ignored (unless the range is 0..0)."""
        value = int(value)
        if value == self.value or ((value > self.maximum or value < self.minimum)
                                   and (self.maximum != 0 or self.minimum != 0)):
            return
        self._values["value"] = value
        self.valueChanged.emit(value)

    def setValue(self, value):
        self.value = value

    def reset(self):
        self._values["value"] = self.minimum - 1

    def setRange(self, low, high):
        self.minimum, self.maximum = low, high

    @property
    def text(self) -> str:
        span = self.maximum - self.minimum
        percent = 0 if span <= 0 or self.value < self.minimum else int(100 * (self.value - self.minimum) / span)
        return self.format.replace("%p", str(percent)).replace("%v", str(self.value))


class QComboBox(QWidget):
    """A combo box: items, the current index and, when editable, the line edit's text (``currentText``)."""

    activated = Signal("activated(int)")
    textActivated = Signal("textActivated(QString)")
    currentIndexChanged = Signal("currentIndexChanged(int)")
    currentTextChanged = Signal("currentTextChanged(QString)")
    editTextChanged = Signal("editTextChanged(QString)")
    highlighted = Signal("highlighted(int)")
    editable = Property(False)
    duplicatesEnabled = Property(False)
    insertPolicy = Property("InsertAtBottom")
    maxVisibleItems = Property(10)
    sizeAdjustPolicy = Property(None)
    placeholderText = Property("")

    def __init__(self, parent=None, *args):
        super().__init__(parent)
        self._items: List[str] = []
        self._data: List[Any] = []
        self._index = -1
        self._editText = ""

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentIndex(self) -> int:
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        self.setCurrentIndex(index)

    @property
    def currentText(self) -> str:
        if self.editable:
            return self._editText
        return self._items[self._index] if self._index >= 0 else ""

    @currentText.setter
    def currentText(self, text):
        self.setCurrentText(text)

    def itemText(self, index) -> str:
        return self._items[index] if 0 <= index < len(self._items) else ""

    def itemData(self, index, role=None):
        return self._data[index] if 0 <= index < len(self._data) else None

    def findText(self, text, *flags) -> int:
        return self._items.index(text) if text in self._items else -1

    def _setEditText(self, text, edited=False):
        if self.editable and text != self._editText:
            self._editText = text
            # QLineEdit::textChanged is connected to editTextChanged and currentTextChanged
            self.editTextChanged.emit(text)
            self.currentTextChanged.emit(text)

    def setEditText(self, text):
        self._setEditText("" if text is None else str(text))

    def setCurrentIndex(self, index):
        index = int(index)
        if not -1 <= index < len(self._items):
            index = -1
        changed = index != self._index
        self._index = index
        if self.editable:
            self._setEditText(self.itemText(index))
        if changed:
            self.currentIndexChanged.emit(index)
            if not self.editable:
                self.currentTextChanged.emit(self.itemText(index))

    def setCurrentText(self, text):
        if self.editable:
            self.setEditText(text)
        elif text in self._items:
            self.setCurrentIndex(self._items.index(text))

    def addItem(self, text, data=None):
        self.insertItem(len(self._items), text, data)

    def addItems(self, texts):
        for text in texts:
            self.addItem(text)

    def insertItem(self, index, text, data=None):
        self._items.insert(index, str(text))
        self._data.insert(index, data)
        if len(self._items) == 1 and self._index == -1 and not self.placeholderText:
            self.setCurrentIndex(0)  # the first item of an empty combo box becomes current
        elif index <= self._index:
            self._index += 1

    def removeItem(self, index):
        if not 0 <= index < len(self._items):
            return
        del self._items[index]
        del self._data[index]
        if index < self._index:
            self._index -= 1
        elif index == self._index:
            before = self._index
            self._index = -2  # force a change
            self.setCurrentIndex(min(len(self._items) - 1, max(before, 0)) if self._items else -1)

    def clear(self):
        had = self._index
        self._items, self._data, self._index = [], [], -1
        if self.editable:
            self._setEditText("")
        if had != -1:
            self.currentIndexChanged.emit(-1)
            if not self.editable:
                self.currentTextChanged.emit("")

    # -- the user ---------------------------------------------------------------------------------------------
    def userChooses(self, text):
        """A user picking an item in the popup: current index (and edit text), then ``activated``."""
        if text not in self._items:
            raise AssertionError(f"{self.objectName}: no item {text!r} to choose (items: {self._items})")
        index = self._items.index(text)
        self.setCurrentIndex(index)
        self.activated.emit(index)
        self.textActivated.emit(text)

    def userTypes(self, text, replace=True, enter=False):
        """A user typing into an editable combo box, one character at a time; ``enter`` inserts the text as an
        item (the default policy, InsertAtBottom; an existing item is chosen instead)."""
        if not self.editable:
            raise AssertionError(f"{self.objectName} is not editable")
        for k, character in enumerate(text):  # with ``replace`` the first key replaces the selected text
            self._setEditText(character if replace and k == 0 else self._editText + character)
        if enter:
            typed = self._editText
            if typed in self._items and not self.duplicatesEnabled:
                self.setCurrentIndex(self._items.index(typed))
            elif typed:
                self.addItem(typed)
                self.setCurrentIndex(len(self._items) - 1)
            self.activated.emit(self._index)


class QListWidgetItem:
    def __init__(self, text=""):
        self._text = text

    def text(self):
        return self._text

    def setText(self, text):
        self._text = text


class QListWidget(QWidget):
    currentRowChanged = Signal("currentRowChanged(int)")
    itemClicked = Signal("itemClicked(QListWidgetItem*)")

    def __init__(self, parent=None, *args):
        super().__init__(parent)
        self._rows: List[QListWidgetItem] = []

    @property
    def count(self) -> int:
        return len(self._rows)

    def addItem(self, item):
        self._rows.append(item if isinstance(item, QListWidgetItem) else QListWidgetItem(str(item)))

    def item(self, row):
        return self._rows[row] if 0 <= row < len(self._rows) else None

    def takeItem(self, row):
        return self._rows.pop(row) if 0 <= row < len(self._rows) else None

    def clear(self):
        self._rows = []


class QTimer(QObject):
    """Fires ``timeout`` from ``Application.processEvents`` once ``interval`` ms have passed since it started."""

    timeout = Signal("timeout()")
    interval = Property(0, normalise=lambda t, v: int(v))
    singleShot_ = Property(False)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._due = None

    @property
    def active(self) -> bool:
        return self._due is not None

    def isActive(self) -> bool:
        return self.active

    def start(self, interval=None):
        if interval is not None:
            self.interval = interval
        self._due = time.monotonic() + self.interval / 1000.0
        if APPLICATION is not None:
            APPLICATION.timers.add(self)

    def stop(self):
        self._due = None

    def setSingleShot(self, value):
        self.singleShot_ = bool(value)

    def _fireIfDue(self, now) -> bool:
        if self._due is None or now < self._due:
            return False
        if self.singleShot_:
            self._due = None
        else:
            self._due = now + self.interval / 1000.0
        self.timeout.emit()
        return True

    @staticmethod
    def singleShot(msec, callback):
        timer = QTimer()
        timer.setSingleShot(True)
        timer.timeout.connect(callback)
        timer.start(msec)
        return timer


class QSettings(QObject):
    """Values for the test session, shared by every QSettings object (as Qt's are, through the file)."""

    STORE: Dict[str, Any] = {}
    IniFormat = 1
    UserScope = 0

    def value(self, key, default=None, type=None):
        value = self.STORE.get(key, default)
        return type(value) if type is not None and value is not None else value

    def setValue(self, key, value):
        self.STORE[key] = value

    def contains(self, key) -> bool:
        return key in self.STORE

    def remove(self, key):
        for name in [k for k in self.STORE if k == key or k.startswith(key + "/")]:
            del self.STORE[name]

    def allKeys(self):
        return list(self.STORE)

    def sync(self):
        pass


class QMessageBox(QDialog):
    NoButton = 0
    Ok = 0x00000400
    Save = 0x00000800
    Open = 0x00002000
    Yes = 0x00004000
    No = 0x00010000
    Abort = 0x00040000
    Retry = 0x00080000
    Ignore = 0x00100000
    Close = 0x00200000
    Cancel = 0x00400000
    Discard = 0x00800000
    NoIcon, Information, Warning, Critical, Question = 0, 1, 2, 3, 4
    text = Property("")
    informativeText = Property("")
    detailedText = Property("")
    icon = Property(0)
    standardButtons = Property(Ok)
    textFormat = Property(None)
    dontShowAgainVisible = Property(False)
    dontShowAgainSettingsKey = Property("")

    def exec_(self):
        """What the user answers: ``Application.answerDialog`` (the test scripts the answers)."""
        if APPLICATION is None:
            return self.Ok
        return APPLICATION.answerDialog(self)

    exec = exec_


class QFile:
    ReadOnly = 1

    def __init__(self, path):
        self.path = str(path)

    def exists(self) -> bool:
        import os
        return os.path.isfile(self.path)

    def open(self, mode) -> bool:
        return self.exists()

    def close(self):
        pass


class QIcon:
    def __init__(self, *args):
        self.args = args


class QColor:
    def __init__(self, *args):
        self.args = args


class QSize:
    def __init__(self, width=0, height=0):
        self.width, self.height = width, height


class QRect:
    def __init__(self, x=0, y=0, width=0, height=0):
        self.x, self.y, self.width, self.height = x, y, width, height


class QSizePolicy:
    Fixed, Minimum, Maximum, Preferred, Expanding, MinimumExpanding, Ignored = 0, 1, 4, 5, 7, 3, 13

    def __init__(self, *args):
        self.args = args


class QUrl:
    TolerantMode = 0

    def __init__(self, url="", *args):
        self.url = url

    def toString(self):
        return self.url


class QDesktopServices:
    opened: List[str] = []

    @staticmethod
    def openUrl(url):
        QDesktopServices.opened.append(url.toString() if isinstance(url, QUrl) else str(url))
        return True


class QApplication:
    """Static parts of QApplication the module and slicer.util call."""

    @staticmethod
    def setOverrideCursor(cursor):
        if APPLICATION is not None:
            APPLICATION.setOverrideCursor(cursor)

    @staticmethod
    def restoreOverrideCursor():
        if APPLICATION is not None:
            APPLICATION.restoreOverrideCursor()

    @staticmethod
    def processEvents(*args):
        if APPLICATION is not None:
            APPLICATION.processEvents()


class Qt:
    WaitCursor = 3
    ArrowCursor = 0
    Checked, Unchecked = 2, 0
    RichText, PlainText, AutoText = 1, 0, 2
    TextBrowserInteraction = 13
    AlignLeft, AlignRight, AlignTop, AlignVCenter = 1, 2, 0x20, 0x80
    ShiftModifier, NoModifier = 0x02000000, 0


# -- ctk ---------------------------------------------------------------------------------------------------

class ctkCollapsibleButton(QAbstractButton):
    """A section header: a click collapses or expands it; collapsed, its contents are hidden."""

    contentsCollapsed = Signal("contentsCollapsed(bool)")
    collapsed = Property(False, normalise=lambda w, v: bool(v), changed=lambda w, old, new: w._collapsedChanged(new))
    collapsedHeight = Property(14)

    def __init__(self, *args):
        super().__init__(*args)
        self.checkable = True
        self._values["checked"] = True  # checked = expanded

    def _checkedChanged(self, checked):
        self.toggled.emit(checked)
        self.collapsed = not checked

    def _collapsedChanged(self, collapsed):
        self._values["checked"] = not collapsed
        self.contentsCollapsed.emit(collapsed)


class ctkCheckBox(QCheckBox):
    pass


class ctkCheckablePushButton(QPushButton):
    checkBoxControlsButtonToggleState = Property(False)


class ctkDoubleSpinBox(QDoubleSpinBox):
    pass


class ctkSliderWidget(_RealValueWidget):
    """A slider with a spin box: the value as the spin box holds it (clamped, rounded to ``decimals``)."""

    valueIsChanging = Signal("valueIsChanging(double)")
    maximum = Property(99.0, normalise=lambda w, v: float(v), changed=_range_changed)
    pageStep = Property(10.0)
    tracking = Property(True)


class ctkDoubleSlider(ctkSliderWidget):
    pass


class ctkPathLineEdit(QWidget):
    """A path field with a browse button and a history (``settingKey``)."""

    currentPathChanged = Signal("currentPathChanged(QString)")
    validInputChanged = Signal("validInputChanged(bool)")
    currentPath = Property("", normalise=lambda w, v: "" if v is None else str(v),
                           changed=_notify("currentPathChanged"))
    filters = Property(None)
    nameFilters = Property(None)
    settingKey = Property("")
    showBrowseButton = Property(True)
    showHistoryButton = Property(True)
    label = Property("")

    def addCurrentPathToHistory(self):
        if self.settingKey and self.currentPath:
            history = [p for p in QSettings().value(self.settingKey, []) or [] if p != self.currentPath]
            QSettings().setValue(self.settingKey, [self.currentPath] + history[:9])

    def userChoosesFile(self, path):
        """A user choosing ``path`` in the browse dialog."""
        self.currentPath = str(path)


class ctkDirectoryButton(QWidget):
    directoryChanged = Signal("directoryChanged(QString)")
    directory = Property("", changed=_notify("directoryChanged"))


class ctkComboBox(QComboBox):
    defaultText = Property("")


class ctkMessageBox(QMessageBox):
    pass


class ctkRangeWidget(QWidget):
    valuesChanged = Signal("valuesChanged(double,double)")


class ctkColorPickerButton(QWidget):
    colorChanged = Signal("colorChanged(QColor)")
    color = Property(None, changed=_notify("colorChanged"))


class ctkDoubleRangeSlider(ctkRangeWidget):
    pass


# -- Slicer's MRML widgets (the slicer.q* classes) ------------------------------------------------------------

class qMRMLWidget(QWidget):
    mrmlSceneChanged = Signal("mrmlSceneChanged(vtkMRMLScene*)")

    def __init__(self, parent=None, *args):
        super().__init__(parent)
        self._scene = None

    def mrmlScene(self):
        return self._scene

    def setMRMLScene(self, scene):
        if scene is self._scene:
            return
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)


class qSlicerWidget(qMRMLWidget):
    pass


class qMRMLTableView(qMRMLWidget):
    def __init__(self, parent=None, *args):
        super().__init__(parent)
        self._table = None

    def setMRMLTableNode(self, node):
        self._table = node

    def mrmlTableNode(self):
        return self._table


class qMRMLNodeComboBox(qMRMLWidget):
    """Slicer's node selector on a real MRML scene (see the module docstring for what it keeps)."""

    currentNodeChanged = Signal("currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)")
    currentNodeIDChanged = Signal("currentNodeIDChanged(QString)")
    nodeActivated = Signal("nodeActivated(vtkMRMLNode*)")
    nodeAdded = Signal("nodeAdded(vtkMRMLNode*)")
    nodeAboutToBeRemoved = Signal("nodeAboutToBeRemoved(vtkMRMLNode*)")
    nodeAddedByUser = Signal("nodeAddedByUser(vtkMRMLNode*)")
    nodeTypes = Property((), normalise=lambda w, v: tuple(v or ()), changed=lambda w, o, n: w._refresh())
    showChildNodeTypes = Property(True, changed=lambda w, o, n: w._refresh())
    showHidden = Property(False, changed=lambda w, o, n: w._refresh())
    noneEnabled = Property(False, changed=lambda w, o, n: w._refresh())
    addEnabled = Property(True)
    removeEnabled = Property(True)
    renameEnabled = Property(False)
    editEnabled = Property(False)
    noneDisplay = Property("None")
    selectNodeUponCreation = Property(True)
    baseName = Property("")
    hideChildNodeTypes = Property(())

    def __init__(self, parent=None, *args):
        super().__init__(parent)
        self._current = None
        self._requested = None
        self._items: List[Any] = []
        self._observations: List[int] = []

    # -- what it lists -------------------------------------------------------------------------------------
    def _accepts(self, node) -> bool:
        if node is None or not self.nodeTypes:
            return False
        if node.GetHideFromEditors() and not self.showHidden:
            return False
        if any(node.IsA(t) for t in self.hideChildNodeTypes):
            return False
        if self.showChildNodeTypes:
            return any(node.IsA(t) for t in self.nodeTypes)
        return node.GetClassName() in self.nodeTypes

    def _sceneNodes(self) -> list:
        scene = self._scene
        if scene is None:
            return []
        nodes = [scene.GetNthNode(k) for k in range(scene.GetNumberOfNodes())]
        return [n for n in nodes if self._accepts(n)]

    def _rows(self, items=None) -> list:
        """The combo box's rows: "None" first when enabled, then the nodes."""
        items = self._items if items is None else items
        return ([None] if self.noneEnabled else []) + list(items)

    def nodeCount(self) -> int:
        return len(self._items)

    def nodeFromIndex(self, index):
        return self._items[index] if 0 <= index < len(self._items) else None

    def nodes(self) -> list:
        return list(self._items)

    def currentNode(self):
        return self._current

    @property
    def currentNodeID(self) -> str:
        return self._current.GetID() if self._current is not None else ""

    def setCurrentNodeID(self, nodeID):
        scene = self._scene
        self.setCurrentNode(scene.GetNodeByID(nodeID) if scene is not None and nodeID else None)

    def setCurrentNode(self, node):
        if self._scene is None:
            self._requested = node
            return
        if node is not None and not any(n is node for n in self._items):
            node = None  # not listed: the combo box shows none (or "None")
        self._select(node)

    def setCurrentNodeIndex(self, index):
        self.setCurrentNode(self.nodeFromIndex(index))

    def _select(self, node):
        """qMRMLNodeComboBox::emitCurrentNodeChanged, on change only."""
        if node is self._current:
            return
        self._current = node
        self.currentNodeChanged.emit(node)
        self._signal("currentNodeChanged(bool)").emit(node is not None)
        self.currentNodeIDChanged.emit(node.GetID() if node is not None else "")

    # -- the scene ------------------------------------------------------------------------------------------
    def setMRMLScene(self, scene):
        if scene is self._scene:
            return
        previous = self.currentNodeID if self._items else None
        if self._scene is not None:
            for tag in self._observations:
                self._scene.RemoveObserver(tag)
        self._observations = []
        self._scene = scene
        self._items = self._sceneNodes()
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent,
                          scene.EndBatchProcessEvent, scene.EndImportEvent):
                self._observations.append(scene.AddObserver(event, lambda caller, event: self._refresh()))
        self._current = None if self._current is not None and self._current not in self._items else self._current
        if previous is not None:
            self.setCurrentNodeID(previous)
        else:
            requested, self._requested = self._requested, None
            if requested is not None:
                self.setCurrentNode(requested)
            elif not self.noneEnabled and self._items:
                self._select(self._items[0])
        self.setEnabled(scene is not None)
        self.mrmlSceneChanged.emit(scene)

    def _refresh(self):
        """The scene changed: list its nodes again; a current node that went away gives way to the row now at
        its place (QComboBox's rule for a removed current row), "None" when there is no other."""
        if self._scene is not None and self._scene.IsBatchProcessing():
            return  # the scene model updates at the end of the batch
        before, after = self._items, self._sceneNodes()
        self._items = after
        added = [n for n in after if not any(n is b for b in before)]
        for node in added:
            self.nodeAdded.emit(node)
        current = self._current
        if current is not None and not any(n is current for n in after):
            oldRows = self._rows(before)
            row = next(k for k, n in enumerate(oldRows) if n is current)
            rows = self._rows(after)
            self._select(rows[min(len(rows) - 1, row)] if rows else None)
        elif current is None and not self.noneEnabled and after and not before:
            self._select(after[0])  # the first node of an empty combo box becomes current

    # -- the user ---------------------------------------------------------------------------------------------
    def userChooses(self, node):
        """A user picking ``node`` (a node, or None for the "None" row) in the popup."""
        if not self.isEnabled():
            raise AssertionError(f"{self.objectName} is disabled: a user cannot pick in it")
        if node is None and not self.noneEnabled:
            raise AssertionError(f"{self.objectName} has no 'None' row")
        if node is not None and not any(n is node for n in self._items):
            raise AssertionError(f"{self.objectName} does not list '{node.GetName()}' ({node.GetClassName()}); it "
                                 f"lists {[n.GetName() for n in self._items]}")
        self._select(node)
        self.nodeActivated.emit(node)


class qMRMLSubjectHierarchyComboBox(qMRMLWidget):
    pass


class qMRMLSliderWidget(ctkSliderWidget):
    def setMRMLScene(self, scene):
        pass


class qMRMLSpinBox(ctkDoubleSpinBox):
    def setMRMLScene(self, scene):
        pass


class qMRMLRangeWidget(ctkRangeWidget):
    pass


class qSlicerScriptedLoadableModuleWidget(QWidget):
    pass


QT_CLASSES = (QObject, QWidget, QFrame, QMainWindow, QDialog, QLabel, QAbstractButton, QPushButton, QToolButton,
              QRadioButton, QCheckBox, QGroupBox, QLineEdit, QPlainTextEdit, QTextEdit, QSpinBox, QDoubleSpinBox,
              QSlider, QProgressBar, QComboBox, QListWidget, QListWidgetItem, QTimer, QSettings, QMessageBox, QFile,
              QIcon, QColor, QSize, QRect, QSizePolicy, QUrl, QDesktopServices, QApplication, Qt, QLayout,
              QVBoxLayout, QHBoxLayout, QFormLayout, QGridLayout)
CTK_CLASSES = (ctkCollapsibleButton, ctkCheckBox, ctkCheckablePushButton, ctkDoubleSpinBox, ctkSliderWidget,
               ctkDoubleSlider, ctkPathLineEdit, ctkDirectoryButton, ctkComboBox, ctkMessageBox, ctkRangeWidget,
               ctkColorPickerButton, ctkDoubleRangeSlider)
SLICER_CLASSES = (qMRMLWidget, qSlicerWidget, qMRMLTableView, qMRMLNodeComboBox, qMRMLSubjectHierarchyComboBox,
                  qMRMLSliderWidget, qMRMLSpinBox, qMRMLRangeWidget, qSlicerScriptedLoadableModuleWidget)


# -- .ui files ------------------------------------------------------------------------------------------------

def _property_value(element):
    kind = element.tag
    if kind in ("string", "cstring", "enum", "set"):
        return element.text or ""
    if kind == "bool":
        return (element.text or "").strip() == "true"
    if kind == "number":
        return int(element.text)
    if kind in ("double", "float"):
        return float(element.text)
    if kind == "stringlist":
        return [s.text or "" for s in element.findall("string")]
    if kind == "rect":
        return QRect(*(int(element.findtext(k)) for k in ("x", "y", "width", "height")))
    if kind == "size":
        return QSize(int(element.findtext("width")), int(element.findtext("height")))
    return element  # anything else (a font, a size policy): kept as the element


class QUiLoader:
    """Builds a .ui file's widgets from the classes of the qt, ctk and slicer namespaces given."""

    def __init__(self, namespaces=None):
        self.namespaces = namespaces or []

    def _class(self, name):
        for namespace in self.namespaces:
            found = getattr(namespace, name, None)
            if isinstance(found, type):
                return found
        raise KeyError(f"no widget class {name} (a .ui file uses it)")

    def load(self, qfile, parent=None):
        path = qfile.path if isinstance(qfile, QFile) else str(qfile)
        root = ET.parse(path).getroot()
        named: Dict[str, QObject] = {}
        top = self._widget(root.find("widget"), parent, named)
        for connection in root.iter("connection"):
            sender, receiver = named[connection.findtext("sender")], named[connection.findtext("receiver")]
            slot = connection.findtext("slot").split("(")[0]
            sender.connect(connection.findtext("signal"), getattr(receiver, slot))
        return top

    def _apply_properties(self, obj, element, path):
        declared = _qt_properties(type(obj))
        for prop in element.findall("property"):
            name, value = prop.get("name"), _property_value(prop[0])
            if prop.get("stdset") == "0":
                obj.setProperty(name, value)
            elif name in declared:
                setattr(obj, name, value)
            else:
                raise KeyError(f"{path}: {type(obj).__name__} '{obj.objectName}' has no property {name!r}")

    def _widget(self, element, parent, named):
        widget = self._class(element.get("class"))(parent)
        widget.objectName = element.get("name")
        named[widget.objectName] = widget
        self._apply_properties(widget, element, "widget")
        for child in element:
            if child.tag == "layout":
                widget.setLayout(self._layout(child, widget, named))
            elif child.tag == "widget":
                self._widget(child, widget, named)
        return widget

    def _layout(self, element, owner, named):
        layout = self._class(element.get("class"))()
        layout.objectName = element.get("name") or ""
        if layout.objectName:
            named[layout.objectName] = layout
        self._apply_properties(layout, element, "layout")
        for item in element.findall("item"):
            for child in item:
                if child.tag == "widget":
                    layout.addWidget(self._widget(child, owner, named))
                elif child.tag == "layout":
                    layout.addLayout(self._layout(child, owner, named))
        return layout


def ui_signals(widget) -> Dict[str, str]:
    """The signals a widget class declares (for tests that check what the module connects to)."""
    return _declared_signals(type(widget))
