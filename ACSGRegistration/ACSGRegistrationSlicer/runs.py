"""Registration and fine-tuning in the background, for the panel: the inputs are exported from the scene at
the start (Slicer's process), the backend's command line does the work in its own process
(``backgroundRun.BackgroundRun``), and the output nodes are made in the scene only once it has succeeded: a
cancelled or failed run adds no node. Both are driven by ``poll()`` from the panel's timer."""

import json
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import SimpleITK as sitk

from ACSGRegistrationLib.errors import Cancelled, InputError
from ACSGRegistrationLib.saved import READABLE_OUTPUTS

from .backgroundRun import BackgroundRun, lossFromLine, stepFromLine
from .inputs import InputSide
from .outputNodes import RegistrationOutput, createOutputNodes

PREPARATION_SHARE = 0.2  # of a fine-tuning's progress bar, when a data folder is cropped first


class StagedRun:
    """What the panel drives: one backend process at a time (``stage``), polled, its progress shown, cancelled.
    Nothing here waits on a process without a bound, except ``finish()`` called by a script on a run that has not
    ended (it waits for the run, as a function call would; ``timeout`` bounds it)."""

    stage: BackgroundRun

    def start(self):
        self.stage.start()
        return self

    def poll(self) -> List[str]:
        return self.stage.poll()

    @property
    def finished(self) -> bool:
        return self.stage.finished

    @property
    def fraction(self) -> float:
        return self.stage.fraction

    @property
    def message(self) -> str:
        return self.stage.message

    def cancel(self) -> None:
        self.stage.cancel()
        self.stage.wait(timeout=2)
        self.stage.cleanUp()

    def ended(self, what: str, timeout: Optional[float] = None) -> None:
        """Raise Cancelled, or InputError with the backend's message, unless the run succeeded; waits for it
        (``timeout`` seconds at most: then it is ended and the wait is an error)."""
        if self.stage.cancelled:
            raise Cancelled(f"{what} cancelled: no output was made")
        self.waitOrStop(what, timeout)
        if not self.stage.succeeded:
            raise InputError(self.stage.errorMessage())

    def waitOrStop(self, what: str, timeout: Optional[float]) -> None:
        """Wait for the run (``timeout`` seconds at most: then it is ended and the wait is an error); its stop
        file is removed either way."""
        if not self.stage.cancelled and not self.wait(timeout):
            self.stage.cancel(grace=0.0)
            self.stage.cleanUp()
            raise InputError(f"{what} did not end within {timeout:.0f} s: it was stopped")
        self.stage.cleanUp()

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> bool:
        """Poll until the run has ended or ``timeout`` seconds have passed (None: until it ends); True when it
        ended. Scripts and ``finish`` use it; the panel polls from its timer."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if end is not None and time.monotonic() > end:
                return False
            self.poll()
            time.sleep(interval)
        self.poll()
        return True


class RegistrationRun(StagedRun):
    """One pair registered by ``acsgreg register`` in a separate process; ``finish()`` makes the output nodes."""

    def __init__(self, fixed: InputSide, moving: InputSide, checkpoint: str, device: str = "auto",
                 refineSteps: int = 0, outputs: Optional[Dict] = None, name: Optional[str] = None):
        self.fixed, self.moving, self.outputs, self.name = fixed, moving, dict(outputs or {}), name
        self.work = tempfile.mkdtemp(prefix="acsg-register-")
        arguments = ["register", "--checkpoint", checkpoint, "--device", device, "--refine-steps", int(refineSteps),
                     "--outputs", ",".join(READABLE_OUTPUTS), "--out", os.path.join(self.work, "result")]
        for side in (fixed, moving):
            what = "fixed" if side is fixed else "moving"
            # Uncompressed: written and read in a fraction of a second, removed at the end. NRRD, not NIfTI: it
            # keeps the geometry in double precision (NIfTI's is float32), so the background run crops exactly
            # what a run in Slicer's process would (a 1e-6 mm shift can flip a mask voxel at its threshold).
            path = os.path.join(self.work, f"{what}.nrrd")
            sitk.WriteImage(side.source, path)
            arguments += [f"--{what}", path]
            if side.mask is not None:
                segPath = os.path.join(self.work, f"{what}_seg.nrrd")
                sitk.WriteImage(side.mask, segPath)
                arguments += [f"--{what}-seg", segPath, f"--{what}-vertebra", "1"]
        self.stage = BackgroundRun(arguments, "registration")

    def cancel(self) -> None:
        super().cancel()
        self._clean()

    def finish(self, timeout: Optional[float] = None) -> RegistrationOutput:
        """The output nodes (the given ones filled, or new ones) once the process has succeeded; raises
        Cancelled, or InputError with the backend's message. The temporary files are removed either way."""
        from ACSGRegistrationLib.saved import load_result
        try:
            self.ended("registration", timeout)
            result = load_result(os.path.join(self.work, "result"))
            output = createOutputNodes(result, self.fixed, self.moving, name=self.name, **self.outputs)
            output.notes = self.stage.notes()
            output.seconds = (self.stage.ended or time.monotonic()) - self.stage.started
            return output
        finally:
            self._clean()

    def _clean(self):
        shutil.rmtree(self.work, ignore_errors=True)


class FineTuneRun(StagedRun):
    """Fine-tuning by ``acsgreg prepare`` (a data folder not yet cropped; cropped once into the run folder) then
    ``acsgreg finetune``, each in a separate process; pairs of the scene come as crops already written
    (``sceneRecords``) and join the folder's. Every loss line goes to ``onLoss(step, loss)`` (the chart)."""

    def __init__(self, outputFolder: str, checkpoint: str, iterations: int, learningRate: float, batchSize: int,
                 resume: bool, device: str, dataFolder: Optional[str] = None, sceneRecords: Sequence = (),
                 onLoss: Optional[Callable[[int, float], None]] = None):
        from ACSGRegistrationLib.crops import INDEX
        self.outputFolder, self.onLoss, self.sceneRecords = outputFolder, onLoss, list(sceneRecords)
        self.arguments = [
            "finetune", "--checkpoint", checkpoint, "--out", outputFolder, "--steps", int(iterations),
            "--lr", repr(float(learningRate)), "--batch-size", int(batchSize), "--device", device,
            "--print-every", 1, "--checkpoint-every", max(1, min(25, int(iterations) // 4 or 1))]
        if not resume:
            self.arguments.append("--restart")
        self.dataCrops, self.stage = dataFolder, None
        if dataFolder and not os.path.isfile(os.path.join(dataFolder, INDEX)):
            self.dataCrops = os.path.join(outputFolder, "crops")
            if not os.path.isfile(os.path.join(self.dataCrops, INDEX)):
                self.stage = BackgroundRun(["prepare", "--manifest", dataFolder, "--out", self.dataCrops],
                                           "crop preparation")
        self.prepared = self.stage is not None
        if not (self.dataCrops or self.sceneRecords):
            raise InputError("no training pairs: choose a training data folder or add pairs from the scene")
        if self.stage is None:
            self.stage = self._finetune()

    def _finetune(self) -> BackgroundRun:
        return BackgroundRun(self.arguments + ["--crops", self._trainingCrops()], "fine-tuning", self._line)

    def _trainingCrops(self) -> str:
        """The folder's crops, with the scene's in one index beside them when there are both."""
        from ACSGRegistrationLib.crops import read_index, write_index
        if not self.sceneRecords:
            return self.dataCrops
        records = (read_index(self.dataCrops) if self.dataCrops else []) + self.sceneRecords
        folder = os.path.join(self.outputFolder, "training_crops")
        os.makedirs(folder, exist_ok=True)
        write_index(folder, records)
        return folder

    def _line(self, line: str):
        loss, step = lossFromLine(line), stepFromLine(line)
        if loss is not None and step is not None and self.onLoss is not None:
            self.onLoss(step, loss)

    def poll(self) -> List[str]:
        lines = self.stage.poll()
        if self.stage.title == "crop preparation" and self.stage.succeeded:
            self.stage.cleanUp()
            self.stage = self._finetune().start()
        return lines

    @property
    def finished(self) -> bool:
        return self.stage.finished and (self.stage.title == "fine-tuning" or not self.stage.succeeded)

    @property
    def fraction(self) -> float:
        """Cropping a data folder is the first fifth, when there is one; the training steps the rest."""
        share = PREPARATION_SHARE if self.prepared else 0.0
        if self.stage.title != "fine-tuning":
            return share * self.stage.fraction
        return share + (1.0 - share) * self.stage.fraction

    def finish(self, timeout: Optional[float] = None) -> Dict:
        """The training summary (status, steps, checkpoint: the model to register with now); raises Cancelled
        (a stopped run keeps its last checkpoint and resumes from it), or InputError with the backend's message."""
        self.waitOrStop(self.stage.title, timeout)
        if self.stage.cancelled:
            raise Cancelled(f"{self.stage.title} stopped: the run in {self.outputFolder} resumes from its last "
                            "checkpoint")
        start = max((k for k, line in enumerate(self.stage.lines) if line == "{"), default=None)
        if self.stage.title != "fine-tuning" or start is None:
            raise InputError(self.stage.errorMessage())
        return json.loads("\n".join(self.stage.lines[start:]))

