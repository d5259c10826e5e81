"""The Widget's run, progress, cancel and error handling, driven without Qt: the module's own
Widget methods with stand-in widgets and timer, the real worker thread and the real Logic on
slicer-core. (Layout, widget classes and parameter bindings: tests/test_slicer_ui.py.)"""

import contextlib
import time
import types
from pathlib import Path

import numpy as np
import pytest

from tests import _slicer
from TernarySegmentationLib.phantom import make_phantom

slicer = _slicer.slicer


class Widget(types.SimpleNamespace):
    """A stand-in for a Qt widget: properties are plain attributes."""

    def setVisible(self, visible):
        self.visible = visible


class Timer:
    def __init__(self):
        self.active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


@pytest.fixture
def module():
    return _slicer.load_module()


@pytest.fixture
def widget(module, monkeypatch):
    scene = _slicer.scene()
    scene.Clear()
    errors = []

    @contextlib.contextmanager
    def error_display(message=None, show=True, waitCursor=False):  # records what Slicer would show
        try:
            yield
        except Exception as error:
            errors.append((message, error))

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", error_display)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kwargs: None)
    w = module.TernarySegmentationWidget()
    w.logic = module.TernarySegmentationLogic()
    w.ui = types.SimpleNamespace(
        applyButton=Widget(enabled=False, toolTip=""), cancelButton=Widget(enabled=False),
        progressBar=Widget(value=0, visible=False), statusLabel=Widget(text=""))
    w._timer = Timer()
    image = make_phantom(200_007, shape=(40, 80, 80), spacing=(3.5, 3.5, 4.0)).to_sitk()[0]
    volume = module.image_to_volume(image, name="CT")
    w._parameterNode = types.SimpleNamespace(
        inputVolume=volume, outputSegmentation=None, probabilityVolume=None, modelPath=Path(""),
        threads=0, largestComponent=False)
    w.errors = errors
    w._checkCanApply()     # what the parameter node's observer does
    return w


def drive(widget, seconds=120):
    """The main thread's event loop: the timer's polls until the run is over."""
    seen = []
    deadline = time.monotonic() + seconds
    while widget._run is not None:
        assert time.monotonic() < deadline, "the worker did not finish"
        assert widget._timer.active
        assert not widget.ui.applyButton.enabled and widget.ui.cancelButton.enabled
        widget._poll()
        seen.append(widget.ui.progressBar.value)
        time.sleep(0.005)
    return seen


def test_apply_runs_on_a_worker_and_applies_on_the_main_thread(widget):
    assert widget.ui.applyButton.enabled and not widget.ui.cancelButton.enabled
    widget.onApplyButton()
    assert widget._run is not None and widget.ui.progressBar.visible
    seen = drive(widget)
    assert widget.errors == []
    assert seen == sorted(seen) and seen[-1] == 100
    segmentation = widget._parameterNode.outputSegmentation     # created and remembered
    assert segmentation is not None and segmentation.IsA("vtkMRMLSegmentationNode")
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, "TernarySegmentation_pancreas",
                                                      widget._parameterNode.inputVolume)
    assert np.count_nonzero(mask)
    surface = segmentation.GetSegmentation().GetSegment("TernarySegmentation_pancreas").GetRepresentation(
        "Closed surface")
    assert surface is not None and surface.GetNumberOfPoints() > 0    # for the 3D view
    assert widget.ui.statusLabel.text.startswith("Pancreas ") and " ml in " in widget.ui.statusLabel.text
    assert widget.ui.applyButton.enabled and not widget.ui.cancelButton.enabled
    assert not widget.ui.progressBar.visible and not widget._timer.active


def test_cancel_changes_nothing(widget):
    scene = slicer.mrmlScene
    widget.onApplyButton()
    widget.onCancelButton()
    assert widget.ui.statusLabel.text == "Cancelling..."
    drive(widget)
    assert widget.errors == []
    assert widget.ui.statusLabel.text == "Cancelled; nothing was changed."
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert widget._parameterNode.outputSegmentation is None
    assert widget.ui.applyButton.enabled


def test_errors_are_shown_and_the_gui_recovers(widget, tmp_path, monkeypatch):
    broken = tmp_path / "broken.tsm"
    broken.write_bytes(b"not a model")
    widget._parameterNode.modelPath = broken
    widget.onApplyButton()                                   # fails before any thread starts
    ((message, error),) = widget.errors
    assert message == "Cannot start the segmentation." and "broken.tsm" in str(error)
    assert widget._run is None and widget.ui.applyButton.enabled

    widget.errors.clear()
    widget._parameterNode.modelPath = Path("")

    def fails(self, progress=None, cancel=None):
        raise MemoryError("out of memory in the network")
    monkeypatch.setattr(type(widget.logic.prepare(widget._parameterNode.inputVolume)), "run", fails)
    widget.onApplyButton()
    drive(widget)
    ((message, error),) = widget.errors                      # raised on the worker, shown on the main thread
    assert message == "Segmentation failed." and isinstance(error, MemoryError)
    assert widget.ui.statusLabel.text == "Failed."
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_scene_close_cancels_and_waits_for_the_worker(widget):
    widget.setParameterNode = lambda node: None
    widget.onApplyButton()
    thread = widget._run["thread"]
    widget.onSceneStartClose(None, None)
    assert not thread.is_alive() and widget._run is None and not widget._timer.active


def test_apply_needs_an_input_volume(widget):
    widget._parameterNode.inputVolume = None
    widget._checkCanApply()
    assert not widget.ui.applyButton.enabled and widget.ui.applyButton.toolTip == "Select the input CT volume"
