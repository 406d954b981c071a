"""The module's self-test cases (``ACSGRegistrationTest`` in the module file mixes them into Slicer's
ScriptedLoadableModuleTest): synthetic vertebrae made here (nothing is downloaded), registered by the logic in
Slicer's process and in the background, then the panel driven through its widgets as a user drives it (node
combo boxes, typed vertebrae, buttons; the background runs followed by the panel's own timer). Slicer's CTest
runner loads the ``test_*`` methods one by one: the class's ``setUp`` skips each, with its reason, where PyTorch
is missing."""

import os
import tempfile
import time

import numpy as np

import slicer

from ACSGRegistrationLib.errors import Cancelled, InputError

from . import dependencies, testScene
from .conversion import ijkToRasOfNode
from .outputNodes import FOREGROUND_CHOICES

NO_TORCH = ("PyTorch is not installed here (install the PyTorch extension): the ACSGRegistration self-test "
            "needs it to run the model, so it is skipped")
NO_GUI = "no Slicer GUI (or the module is not loaded) here: the panel's click-through test needs one"


class SelfTestCases:
    """The test methods; the class that mixes them in gives ``newLogic()`` and Slicer's assertions."""

    TESTS = ("test_RegisterSyntheticVertebrae", "test_InputErrors", "test_BatchAndFineTune",
             "test_BackgroundRegistrationAndCancel", "test_ClickThrough")

    def _tempFolder(self):
        if not hasattr(self, "_tmp"):
            self._tmp = tempfile.TemporaryDirectory(prefix="ACSGRegistrationTest-")
        return self._tmp.name

    def _model(self):
        path = os.path.join(self._tempFolder(), "tiny.pt")
        if not os.path.isfile(path):
            testScene.makeTinyModel(path)
        return path

    def _waitForPanel(self, widget, timeout=600):
        """The application's event loop until the panel's run has ended (its timer polls the run)."""
        end = time.monotonic() + timeout
        while widget.run is not None:
            if time.monotonic() > end:
                self.fail(f"the panel's run did not end within {timeout} s")
            slicer.app.processEvents()
            time.sleep(0.05)

    # -- the logic --------------------------------------------------------------------------------------
    def test_RegisterSyntheticVertebrae(self):
        self.delayDisplay("Registering synthetic vertebrae (logic)")
        data = testScene.createSyntheticScene()
        before = {k: (np.array(slicer.util.arrayFromVolume(v), copy=True), ijkToRasOfNode(v))
                  for k, v in data.items() if v.IsA("vtkMRMLVolumeNode")}
        logic = self.newLogic()
        out = logic.register(data["fixedVolume"], data["movingVolume"], data["fixedSegmentation"],
                             data["movingSegmentation"], "L1", "L1", checkpoint=self._model(), device="cpu")
        for node in (out.warpedVolume, out.transform, out.deformation, out.jacobian, out.warpedSegmentation,
                     out.metricsTable):
            self.assertIsNotNone(node)
            self.assertIsNotNone(node.GetScene())
        self.assertEqual(set(out.metrics), {"initial", "affine", "final"})
        self.assertEqual(out.metricsTable.GetNumberOfRows(), 3)
        self.assertGreater(float(slicer.util.arrayFromVolume(out.jacobian).std()), 1e-4)
        for k, (array, matrix) in before.items():
            self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(data[k]), array), k)
            self.assertTrue(np.allclose(ijkToRasOfNode(data[k]), matrix), k)
        self.assertTrue(out.deformation.GetDisplayNode().GetVisibility())
        logic.showResults(out, foreground="Jacobian map", showGrid=False)
        self.assertFalse(out.deformation.GetDisplayNode().GetVisibility())
        self.delayDisplay("Registration of synthetic vertebrae passed")

    def test_InputErrors(self):
        self.delayDisplay("Error messages for bad inputs")
        data = testScene.createSyntheticScene()
        logic = self.newLogic()
        nodes = (data["fixedVolume"], data["movingVolume"], data["fixedSegmentation"], data["movingSegmentation"])
        for change, message in (({0: None}, "no fixed volume"), ({3: None}, "only the fixed volume has a"),
                                ({4: "L7"}, "has no segment 'L7'"), ({5: "99"}, "label 99 is not in the moving")):
            args = list(nodes) + ["L1", "20"]
            for k, value in change.items():
                args[k] = value
            with self.assertRaises(InputError) as caught:
                logic.register(*args, checkpoint=self._model(), device="cpu", show=False)
            self.assertIn(message, str(caught.exception))
        with self.assertRaises(InputError) as caught:
            logic.register(*nodes, "L1", "L1", checkpoint=self._model(), warpedVolume=data["fixedVolume"])
        self.assertIn("inputs are never overwritten", str(caught.exception))
        self.delayDisplay("Error messages passed")

    def test_BatchAndFineTune(self):
        self.delayDisplay("Batch registration and fine-tuning (logic)")
        data = testScene.createSyntheticScene()
        logic = self.newLogic()
        model = self._model()
        pairs = [(data["fixedVolume"], data["movingVolume"], data["fixedSegmentation"], data["movingSegmentation"],
                  "L1", "L1"),
                 dict(fixed=data["fixedVolume"], moving=data["movingVolume"],
                      fixedSegmentation=data["fixedSegmentation"],
                      movingSegmentation=data["movingSegmentation"], fixedLabel="L2", movingLabel="21", name="L2")]
        outs = logic.registerPairs(pairs, checkpoint=model, device="cpu")
        self.assertEqual(len(outs), 2)
        self.assertTrue(all(o.metrics["final"]["dice"] >= 0 for o in outs))
        runFolder = os.path.join(self._tempFolder(), "finetune")
        steps = []
        tuned = logic.fineTune(runFolder, scenePairs=pairs[:1], checkpoint=model, iterations=2, batchSize=2,
                               device="cpu", progress=lambda s, t, terms: steps.append(s))
        self.assertEqual(tuned["status"], "finished")
        self.assertEqual(steps, [1, 2])
        self.assertTrue(os.path.isfile(tuned["checkpoint"]))
        self.assertEqual(logic.lossTable.GetNumberOfRows(), 2)
        again = logic.register(data["fixedVolume"], data["movingVolume"], data["fixedSegmentation"],
                               data["movingSegmentation"], "L1", "L1", checkpoint=tuned["checkpoint"], device="cpu",
                               show=False)
        self.assertIsNotNone(again.transform)
        self.delayDisplay("Batch and fine-tuning passed")

    def test_BackgroundRegistrationAndCancel(self):
        self.delayDisplay("Registration in the background: cancelled, then to the end")
        data = testScene.createSyntheticScene()
        logic = self.newLogic()
        args = (data["fixedVolume"], data["movingVolume"], data["fixedSegmentation"], data["movingSegmentation"],
                "L1", "L1")
        slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)  # there from the start in Slicer
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        run = logic.startRegistration(*args, checkpoint=self._model(), device="cpu")
        time.sleep(0.5)
        asked = time.monotonic()
        run.cancel()
        self.assertLess(time.monotonic() - asked, 1.5)
        with self.assertRaises(Cancelled):
            run.finish()
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        out = logic.startRegistration(*args, checkpoint=self._model(), device="cpu").finish(timeout=600)
        self.assertEqual(set(out.metrics), {"initial", "affine", "final"})
        self.delayDisplay("Background registration passed")

    # -- the panel ----------------------------------------------------------------------------------------
    def test_ClickThrough(self):
        """The panel as a user drives it: nodes picked in the combo boxes, vertebrae typed and chosen, Apply, the
        display toggles, fine-tuning on the scene pair, Apply with the new model."""
        if not dependencies.hasGui() or not hasattr(getattr(slicer, "modules", None), "acsgregistration"):
            self.skipTest(NO_GUI)
        self.delayDisplay("Click-through test of the panel")
        data = testScene.createSyntheticScene()
        slicer.util.selectModule("ACSGRegistration")
        widget = slicer.modules.acsgregistration.widgetRepresentation().self()
        ui, p = widget.ui, widget._parameterNode
        ui.modelPathLineEdit.currentPath = self._model()  # what the file dialog does
        ui.deviceComboBox.currentIndex = ui.deviceComboBox.findText("cpu")
        picks = {"fixedVolumeSelector": data["fixedVolume"], "movingVolumeSelector": data["movingVolume"],
                 "fixedSegmentationSelector": data["fixedSegmentation"],
                 "movingSegmentationSelector": data["movingSegmentation"]}
        for name, node in picks.items():
            getattr(ui, name).setCurrentNode(node)
        for name, node in picks.items():  # every pick stays picked, in the widget and in the parameter node
            self.assertIs(getattr(ui, name).currentNode(), node, name)
            self.assertIs(getattr(p, name.replace("Selector", "")), node, name)
        ui.fixedLabelComboBox.setEditText("L1")
        ui.movingLabelComboBox.setCurrentIndex(ui.movingLabelComboBox.findText("20: vertebrae_L1"))
        self.assertEqual((p.fixedLabel, p.movingLabel), ("L1", "20: vertebrae_L1"))
        self.assertTrue(ui.applyButton.enabled, ui.applyButton.toolTip)
        ui.applyButton.click()
        self._waitForPanel(widget)
        out = widget.lastOutput
        self.assertIsNotNone(out, ui.statusLabel.text)
        self.assertIs(out.fixedVolume, data["fixedVolume"])
        self.assertIsNotNone(out.metricsTable)
        ui.showGridCheckBox.click()
        self.assertFalse(out.deformation.GetDisplayNode().GetVisibility())
        ui.showGridCheckBox.click()
        self.assertTrue(out.deformation.GetDisplayNode().GetVisibility())
        ui.foregroundComboBox.currentIndex = FOREGROUND_CHOICES.index("Jacobian map")
        composite = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
        if composite is not None:
            self.assertEqual(composite.GetForegroundVolumeID(), out.jacobian.GetID())
        # Fine-tune on the scene pair for two steps; the new model becomes the registration model.
        ui.trainingOutputPathLineEdit.currentPath = os.path.join(self._tempFolder(), "panel-finetune")
        ui.iterationsSpinBox.value = 2
        ui.resumeCheckBox.checked = False
        ui.addScenePairButton.click()
        self.assertEqual(ui.scenePairsListWidget.count, 1)
        self.assertTrue(ui.startTrainingButton.enabled, ui.startTrainingButton.toolTip)
        ui.startTrainingButton.click()
        self._waitForPanel(widget)
        self.assertIsNotNone(widget.lastFineTune, ui.trainingStatusLabel.text)
        self.assertEqual(str(p.checkpointPath), widget.lastFineTune["checkpoint"])
        self.assertEqual(ui.modelPathLineEdit.currentPath, widget.lastFineTune["checkpoint"])
        ui.applyButton.click()
        self._waitForPanel(widget)
        self.assertIs(widget.lastOutput.warpedVolume, out.warpedVolume)  # the same nodes, filled again
        self.delayDisplay("Click-through test passed")
