"""TernarySegmentation: segment the pancreas of an abdominal CT on the CPU with a ternary network.

Thin 3D Slicer module over TernarySegmentationLib (the same core as the ``ternaryseg`` command):
Module (title, help), Widget (GUI in Resources/UI/TernarySegmentation.ui, state in a parameter node,
inference on a worker thread), Logic (``TernarySegmentationLogic().process(volumeNode)``, for the
Python console and batch scripts) and Test (``Slicer --testing``).
"""

import os
import pathlib
import threading
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from TernarySegmentationLib import pipeline
from TernarySegmentationLib.slicer_logic import Cancelled, SegmentationLogic, image_to_volume, segment_id

PHANTOM_SAMPLE = "PancreasPhantomCT"   # the Sample Data button's label
MAX_THREADS = 256


#
# TernarySegmentation
#


class TernarySegmentation(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Ternary Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["TernarySegmentation developers"]
        self.parent.helpText = _("""
Segments the <b>pancreas</b> of an abdominal CT (Hounsfield units) in about a second on an ordinary CPU,
with a neural network whose weights and activations are ternary (-1, 0, +1): its hidden convolutions
are bit logic and popcount, not floating-point multiplication.
<p>Select the CT volume and click <b>Apply</b>. The result is the segment "Pancreas" (SNOMED CT 15776009)
in the output segmentation; other segments of that segmentation are never changed, and a second run
replaces only the module's own segment. Optionally the foreground probability (0..1) is written to a
volume.</p>
<p><b>The shipped model is trained on synthetic phantoms only: it demonstrates the method and does
not find the pancreas reliably in real CTs. Not for clinical use.</b> To use a model trained on real CTs (see the training/ folder of the project), choose its
<i>.tsm</i> file under Advanced, Model file.</p>
<p>Try it: Sample Data module, TernarySegmentation, "PancreasPhantomCT" (a synthetic CT made on this
computer), then Apply here.
Batch processing without the GUI: see the project README (TernarySegmentationLib/batch.py).</p>
""")
        self.parent.acknowledgementText = _("""
Implements and extends TernaryNet: M. P. Heinrich, M. Blendowski, O. Oktay, "TernaryNet: faster deep
model inference without GPUs for medical 3D segmentation using sparse and binary convolutions",
International Journal of Computer Assisted Radiology and Surgery 13(9):1311-1320, 2018.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: a synthetic abdominal CT made on the user's machine (nothing is downloaded)
#


def registerSampleData():
    """Add the phantom CT to the Sample Data module."""
    import SampleData

    logic = SampleData.SampleDataLogic
    if hasattr(logic, "registerCustomSampleDataCategory"):  # Slicer 5.12+
        logic.registerCustomSampleDataCategory("TernarySegmentation", title=_("TernarySegmentation"))
    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    # No file to download: the thumbnail button calls customDownloader, which makes the CT here.
    # (SampleData.downloadSample() does not call it; scripts use TernarySegmentationLogic().loadPhantomCT().)
    logic.registerCustomSampleDataSource(
        category="TernarySegmentation",
        sampleName=PHANTOM_SAMPLE,
        thumbnailFileName=os.path.join(iconsPath, "TernarySegmentationPhantomCT.png"),
        uris=[], fileNames=[], nodeNames=[],
        customDownloader=loadPhantomSample,
    )


def loadPhantomSample(source=None):
    """Sample Data's customDownloader: the phantom CT as a new volume node."""
    return TernarySegmentationLogic().loadPhantomCT(name=PHANTOM_SAMPLE)


#
# TernarySegmentationParameterNode
#


def _shippedModelPath():
    try:
        return pipeline.default_model_path()
    except FileNotFoundError:
        return pathlib.Path("")


@parameterNodeWrapper
class TernarySegmentationParameterNode:
    """
    inputVolume - the CT (scalar volume, Hounsfield units).
    outputSegmentation - receives the segment "Pancreas"; created when none is selected.
    modelPath - the .tsm model file (default: the shipped model).
    threads - threads for the network (0: all cores).
    largestComponent - keep only the largest connected component of the result.
    probabilityVolume - optional output: foreground probability 0..1 on the CT's grid.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelPath: pathlib.Path = _shippedModelPath()
    threads: Annotated[int, WithinRange(0, MAX_THREADS)] = 0
    largestComponent: bool = False
    probabilityVolume: vtkMRMLScalarVolumeNode


#
# TernarySegmentationWidget
#


class TernarySegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    POLL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None          # the running segmentation: job, thread, cancel event, outputs
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TernarySegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = TernarySegmentationLogic()
        self.ui.threadsSpinBox.specialValueText = _("all cores")
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.enabled = False

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.resetModelButton.connect("clicked(bool)", self.onResetModelButton)

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self._poll)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stop(wait=True)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self._stop(wait=True)  # the nodes of a running segmentation are going away
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode
        model = self._parameterNode.modelPath
        if str(model) in ("", ".") or not os.path.isfile(model):
            if str(model) not in ("", "."):  # e.g. a scene saved with another installation's path
                self.ui.statusLabel.text = _("Model file {path} not found: using the shipped model.").format(
                    path=model)
            self._parameterNode.modelPath = _shippedModelPath()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # "SlicerParameterName" dynamic properties in the .ui connect the widgets to the fields
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        running = self._run is not None
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if running:
            self.ui.applyButton.toolTip = _("A segmentation is running")
        elif volume is None:
            self.ui.applyButton.toolTip = _("Select the input CT volume")
        else:
            self.ui.applyButton.toolTip = _("Segment the pancreas of the selected CT")
        self.ui.applyButton.enabled = volume is not None and not running
        self.ui.cancelButton.enabled = running

    def onResetModelButton(self) -> None:
        if self._parameterNode:
            self._parameterNode.modelPath = _shippedModelPath()

    def onApplyButton(self) -> None:
        """Check the inputs and copy the CT (main thread), then segment on a worker thread."""
        with slicer.util.tryWithErrorDisplay(_("Cannot start the segmentation."), waitCursor=True):
            p = self._parameterNode
            self.logic.checkOutputs(p.inputVolume, p.outputSegmentation, p.probabilityVolume)
            job = self.logic.prepare(p.inputVolume, modelPath=p.modelPath, threads=p.threads or None,
                                     largestComponent=p.largestComponent,
                                     probabilities=p.probabilityVolume is not None)
            self._start(job, p.outputSegmentation, p.probabilityVolume)

    def onCancelButton(self) -> None:
        if self._run is not None:
            self._run["cancel"].set()
            self.ui.statusLabel.text = _("Cancelling...")

    def _start(self, job, outputSegmentation, probabilityVolume) -> None:
        run = {"job": job, "cancel": threading.Event(), "progress": (0.0, "starting"), "error": None,
               "outputs": (outputSegmentation, probabilityVolume)}

        def progress(fraction, stage):
            run["progress"] = (fraction, stage)      # read by _poll on the main thread

        def work():
            try:
                job.run(progress=progress, cancel=run["cancel"].is_set)  # no MRML access here
            except BaseException as error:  # reported on the main thread
                run["error"] = error

        run["thread"] = threading.Thread(target=work, name="TernarySegmentation", daemon=True)
        self._run = run
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.text = _("Segmenting...")
        self._checkCanApply()
        run["thread"].start()
        self._timer.start()

    def _poll(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        fraction, stage = run["progress"]
        self.ui.progressBar.value = int(round(100 * fraction))
        if not run["cancel"].is_set():
            self.ui.statusLabel.text = _("Segmenting: {stage}").format(stage=stage)
        if not run["thread"].is_alive():
            self._timer.stop()
            self._finish(run)

    def _stop(self, wait=False) -> None:
        run = self._run
        if run is not None:
            run["cancel"].set()
            if wait:
                run["thread"].join()
                self._timer.stop()
                self._run = None
                self.ui.progressBar.setVisible(False)
                self.ui.statusLabel.text = _("Cancelled.")

    def _finish(self, run) -> None:
        """Apply the worker's result to MRML (main thread)."""
        self._run = None
        self.ui.progressBar.setVisible(False)
        self._checkCanApply()
        job, error = run["job"], run["error"]
        if isinstance(error, Cancelled):
            self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
            return
        self.ui.statusLabel.text = _("Failed.")
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            if error is not None:
                raise error
            outputSegmentation, probabilityVolume = run["outputs"]
            segmentation = self.logic.apply(job, outputSegmentation, probabilityVolume)
            if self._parameterNode:
                self._parameterNode.outputSegmentation = segmentation
            segmentation.CreateClosedSurfaceRepresentation()   # shown in the 3D view too
            slicer.util.setSliceViewerLayers(background=job.inputVolume)
            text = job.summary()
            if job.warnings:
                text += "\n" + _("Warning: ") + "\n".join(job.warnings)
            self.ui.statusLabel.text = text


#
# TernarySegmentationLogic
#


class TernarySegmentationLogic(ScriptedLoadableModuleLogic, SegmentationLogic):
    """The module's computation, usable without the GUI (Python console, batch scripts):

        logic = slicer.util.getModuleLogic("TernarySegmentation")  # or TernarySegmentationLogic()
        segmentationNode = logic.process(slicer.util.getNode("CT"))

    ``process(inputVolume, outputSegmentation=None, modelPath=None, threads=None, progress=None,
    cancel=None, largestComponent=False, probabilityVolume=None)``: see
    TernarySegmentationLib/slicer_logic.py, SegmentationLogic.process.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)  # also runs SegmentationLogic.__init__

    def getParameterNode(self):
        return TernarySegmentationParameterNode(super().getParameterNode())

    def loadPhantomCT(self, seed=None, name="PhantomCT"):
        """A synthetic abdominal CT (int16 HU, 0.8 x 0.8 x 2 mm, made here, not downloaded) as a new
        volume node shown in the slice views; returns the node."""
        from TernarySegmentationLib import demo, phantom

        case = phantom.make_phantom(demo.DEMO_SEED if seed is None else seed, shape=demo.DEMO_SHAPE,
                                    spacing=demo.DEMO_SPACING)
        volume = image_to_volume(case.to_sitk()[0], name=name)
        if getattr(slicer, "app", None) is not None:
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
        return volume


#
# TernarySegmentationTest
#


class TernarySegmentationTest(ScriptedLoadableModuleTest):
    """Self-test on a phantom CT: ``Slicer --testing`` or the module's Reload and Test button."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentsPhantom()
        self.setUp()
        self.test_KeepsOtherSegments()
        self.setUp()
        self.test_RejectsBadInput()

    def _phantom(self):
        from TernarySegmentationLib import phantom

        case = phantom.make_phantom(200_001, shape=(48, 96, 96), spacing=(3.0, 3.0, 4.0))
        image, truth = case.to_sitk()
        return image_to_volume(image, name="PhantomCT"), slicer.util.arrayFromVolume(
            image_to_volume(truth, name="truth")).copy()

    def test_SegmentsPhantom(self):
        self.delayDisplay("Segmenting a phantom CT")
        import numpy as np

        volume, truth = self._phantom()
        logic = TernarySegmentationLogic()
        fractions = []
        segmentation = logic.process(volume, progress=lambda f, stage: fractions.append(f))
        sid = segment_id("pancreas")
        segment = segmentation.GetSegmentation().GetSegment(sid)
        self.assertEqual(segment.GetName(), "Pancreas")
        terminology = vtk.reference("")
        self.assertTrue(segment.GetTag(segment.GetTerminologyEntryTagName(), terminology))
        self.assertIn("~SCT^15776009^Pancreas~", terminology.get())
        self.assertEqual([round(c * 255) for c in segment.GetColor()], [249, 180, 111])
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, sid, volume)
        self.assertEqual(mask.shape, truth.shape)
        dice = 2 * np.count_nonzero(mask & (truth > 0)) / (np.count_nonzero(mask) + np.count_nonzero(truth))
        self.assertGreater(dice, 0.3)
        self.assertEqual(fractions[-1], 1.0)
        self.delayDisplay(f"Phantom Dice {dice:.3f}")

    def test_KeepsOtherSegments(self):
        self.delayDisplay("Other segments of the output are kept")
        volume, _truth = self._phantom()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        mine = segmentation.GetSegmentation().AddEmptySegment("", "Pancreas (manual)", [1.0, 0.0, 0.0])
        drawn = (slicer.util.arrayFromVolume(volume) > 150).astype("uint8")
        slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, mine, volume)
        logic = TernarySegmentationLogic()
        for _run in range(2):
            self.assertIs(logic.process(volume, segmentation), segmentation)
            self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 2)
            kept = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, mine, volume)
            self.assertTrue((kept == drawn).all())

    def test_RejectsBadInput(self):
        self.delayDisplay("Bad input gives a clear error")
        logic = TernarySegmentationLogic()
        with self.assertRaisesRegex(ValueError, "no input volume"):
            logic.process(None)
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        with self.assertRaisesRegex(ValueError, "label map"):
            logic.process(labelmap)
