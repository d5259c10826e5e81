"""The module's logic on MRML nodes: volume node in, segmentation node out. GUI-free: used by the
module's Logic class (the Python console API), by its Widget and by the batch script, inside the
Slicer application or, headless, on PyPI's ``slicer-core`` (``headless_scene``).

A run has three steps so that the GUI can run the middle one on a worker thread:

1. ``SegmentationLogic.prepare`` (main thread): validates the nodes, copies the volume's voxels and
   IJK-to-RAS geometry into a SimpleITK image (LPS), loads the model (cached between runs);
2. ``SegmentationJob.run`` (any thread): the Slicer-free pipeline of ``ternaryseg``; touches no MRML;
3. ``SegmentationLogic.apply`` (main thread): writes one segment per foreground class ("Pancreas",
   SNOMED CT 15776009, Slicer's pancreas colour) into the output segmentation node, adding it or
   replacing only that segment's voxels; every other segment of the node is left as it was.

``SegmentationLogic.process`` does the three in a row. Needs ``slicer`` (MRML), ``vtk``, numpy and
SimpleITK, all bundled with Slicer; imported only by Slicer-side code, never by the command line.
"""

import logging
import os
import time
import types
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtkmodules.util import numpy_support

from . import pipeline
from .network import Cancelled, TernaryNetwork

__all__ = ["SegmentationLogic", "SegmentationJob", "InputError", "Cancelled", "SEGMENT_ID_PREFIX",
           "headless_scene", "volume_to_image", "image_to_volume", "segment_id"]

InputError = pipeline.InputError
SEGMENT_ID_PREFIX = "TernarySegmentation_"
_LPS = np.diag([-1.0, -1.0, 1.0])   # RAS <-> LPS: flip x and y

log = logging.getLogger(__name__)


def segment_id(class_name):
    """The ID of the segment that holds class ``class_name``: the logic adds or replaces only
    segments with these IDs."""
    return SEGMENT_ID_PREFIX + class_name


# ------------------------------------------------------------------------------------ geometry

def _node_label(node):
    return f"'{node.GetName()}'" if node.GetName() else node.GetID() or type(node).__name__


def check_input_volume(volumeNode, what="input volume"):
    """Raise InputError unless ``volumeNode`` is a scalar volume node with 3D single-component voxels."""
    if volumeNode is None:
        raise InputError(f"no {what}: select a CT volume")
    if not isinstance(volumeNode, vtk.vtkObject) or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        kind = volumeNode.GetClassName() if isinstance(volumeNode, vtk.vtkObject) else type(volumeNode).__name__
        raise InputError(f"the {what} must be a scalar volume node (a CT), got a {kind}")
    label = _node_label(volumeNode)
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"the {what} {label} is a label map, not a CT; select the CT volume")
    image = volumeNode.GetImageData()
    if image is None:
        raise InputError(f"the {what} {label} has no voxels (no image data)")
    components = image.GetNumberOfScalarComponents()
    if volumeNode.IsA("vtkMRMLVectorVolumeNode") or components != 1:
        raise InputError(f"the {what} {label} has {components} components per voxel (a colour or "
                         "vector volume); a scalar 3D CT is required")
    dims = image.GetDimensions()
    if min(dims) <= 1:
        raise InputError(f"the {what} {label} is a 2D image (size {tuple(dims)}); a 3D CT volume "
                         "is required")


def volume_to_image(volumeNode):
    """A SimpleITK image (LPS) with a copy of the voxels and the exact geometry of ``volumeNode``
    (its IJK-to-RAS matrix; a parent transform is not applied)."""
    check_input_volume(volumeNode)
    array = slicer.util.arrayFromVolume(volumeNode)          # (k, j, i) view of the node's voxels
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    ijk_to_ras = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijk_to_ras)
    m = slicer.util.arrayFromVTKMatrix(ijk_to_ras)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if not (np.isfinite(m).all() and (spacing > 0).all()):
        raise InputError(f"the input volume {_node_label(volumeNode)} has an invalid IJK-to-RAS matrix")
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (_LPS @ (m[:3, :3] / spacing)).ravel()))
    image.SetOrigin(tuple(float(v) for v in _LPS @ m[:3, 3]))
    return image


def _ijk_to_ras(image):
    """The IJK-to-RAS matrix (numpy 4x4) of a SimpleITK image's grid."""
    direction = np.array(image.GetDirection(), np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = _LPS @ direction @ np.diag(image.GetSpacing())
    m[:3, 3] = _LPS @ np.array(image.GetOrigin())
    return m


def _set_volume(volumeNode, array, ijk_to_ras):
    """Give ``volumeNode`` a copy of the (k, j, i) ``array`` as its voxels and ``ijk_to_ras``."""
    slicer.util.updateVolumeFromArray(volumeNode, np.ascontiguousarray(array))
    volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))


def image_to_volume(image, name="CT", scene=None, volumeNode=None):
    """A scalar volume node holding a copy of the SimpleITK ``image`` (voxels and geometry), added
    to ``scene`` (default: slicer.mrmlScene), or written into ``volumeNode``."""
    if volumeNode is None:
        scene = scene or slicer.mrmlScene
        volumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    _set_volume(volumeNode, sitk.GetArrayViewFromImage(image), _ijk_to_ras(image))
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


def _oriented_labelmap(mask, ijk_to_ras):
    """A vtkOrientedImageData (uint8) of the (k, j, i) ``mask`` on the grid ``ijk_to_ras``."""
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = mask.reshape(-1)
    labelmap.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    return labelmap


# ------------------------------------------------------------------------------------ the job

@dataclass
class SegmentationJob:
    """One run, from ``SegmentationLogic.prepare``. ``run`` may be called on any thread: it uses
    only the copies made here, never the MRML nodes. After it: ``result`` (pipeline.Result),
    ``seconds``; after ``apply``: ``segmentIds`` and ``volumesMl`` (class name -> ml)."""

    inputVolume: object
    image: sitk.Image
    ijkToRAS: np.ndarray
    network: TernaryNetwork
    threads: object = None
    largestComponent: bool = False
    probabilities: bool = False
    warnings: list = field(default_factory=list)
    imageWarnings: object = None     # check_image's findings on ``image`` once prepare ran it
    result: object = None
    seconds: float = 0.0
    segmentIds: dict = field(default_factory=dict)
    volumesMl: dict = field(default_factory=dict)

    @property
    def classes(self):
        return tuple(self.network.model.classes)

    def run(self, progress=None, cancel=None):
        """Segment the copied CT. ``progress(fraction, stage)``, ``cancel()`` as in
        pipeline.segment (network.Cancelled is raised when ``cancel()`` returns True)."""
        start = time.perf_counter()
        self.result = pipeline.segment(self.image, self.network, threads=self.threads, progress=progress,
                                       cancel=cancel, largest_component=self.largestComponent,
                                       probabilities=self.probabilities,
                                       image_warnings=self.imageWarnings)  # checked in prepare
        self.seconds = time.perf_counter() - start
        self.warnings += [w for w in self.result.warnings if w not in self.warnings]
        return self.result

    def volumesText(self):
        """'Pancreas 12.3 ml' (one entry per foreground class), after ``apply``."""
        return ", ".join(f"{pipeline.segment_style(i, name)[0]} {self.volumesMl.get(name, 0.0):.1f} ml"
                         for i, name in enumerate(self.classes[1:]))

    def summary(self):
        """One line for a status bar or a log: volume per class and the time segmenting took."""
        return f"{self.volumesText()} in {self.seconds:.1f} s"


# ------------------------------------------------------------------------------------ the logic

class SegmentationLogic:
    """Segment the pancreas of a CT volume node into a segmentation node (see the module docstring)."""

    def __init__(self):
        self._network = None
        self._networkKey = None
        self.lastJob = None   # the last process() run: timings (job.result.timings), volumes, warnings

    # -- model
    def loadNetwork(self, modelPath=None):
        """The network of ``modelPath`` (default, None or '': the shipped model), read and packed
        once and reused while the file is unchanged (a pathlib.Path('') from the GUI is '.': the
        shipped model too). FileNotFoundError, ModelFileError."""
        text = "" if modelPath is None else os.fspath(modelPath)
        path = pipeline.default_model_path() if text in ("", ".") else text
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file {path}: no such file")
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
        if key != self._networkKey:
            self._network = TernaryNetwork(pipeline.load_model(path))
            self._networkKey = key
        return self._network

    # -- the three steps
    def prepare(self, inputVolume, modelPath=None, threads=None, largestComponent=False,
                probabilities=False):
        """Check the input and copy it for a run (main thread). InputError names the problem."""
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise InputError(f"threads must be a whole number >= 1 (or 0 / None for all cores), got {threads!r}")
        image = volume_to_image(inputVolume)
        try:
            found = pipeline.check_image(image)
        except InputError as error:
            raise InputError(f"input volume {_node_label(inputVolume)}: {error}") from None
        network = self.loadNetwork(modelPath)
        return SegmentationJob(inputVolume=inputVolume, image=image, ijkToRAS=_ijk_to_ras(image),
                               network=network, threads=threads or None,
                               largestComponent=bool(largestComponent), probabilities=bool(probabilities),
                               warnings=list(found), imageWarnings=tuple(found))

    def checkOutputs(self, inputVolume, outputSegmentation=None, probabilityVolume=None):
        """InputError if an output node cannot take the result (before any work is done)."""
        if outputSegmentation is not None and not (isinstance(outputSegmentation, vtk.vtkObject)
                                                   and outputSegmentation.IsA("vtkMRMLSegmentationNode")):
            raise InputError("the output segmentation must be a segmentation node, got a "
                             f"{getattr(outputSegmentation, 'GetClassName', lambda: type(outputSegmentation).__name__)()}")
        if probabilityVolume is not None:
            if not (isinstance(probabilityVolume, vtk.vtkObject) and probabilityVolume.IsA("vtkMRMLScalarVolumeNode")) \
                    or probabilityVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                raise InputError("the probability map output must be a scalar volume node")
            if probabilityVolume is inputVolume:
                raise InputError("the probability map output is the input volume; choose or create "
                                 "another volume (the input is never overwritten)")
        if outputSegmentation is not None and inputVolume is not None and \
                outputSegmentation.GetTransformNodeID() != inputVolume.GetTransformNodeID():
            raise InputError(f"the output segmentation {_node_label(outputSegmentation)} is under another "
                             "transform than the input volume; choose another segmentation or create a new one")
        if outputSegmentation is not None:
            segmentation = outputSegmentation.GetSegmentation()
            if segmentation.GetNumberOfSegments() and not segmentation.IsSourceRepresentationImageData():
                raise InputError(
                    f"the output segmentation {_node_label(outputSegmentation)} stores its segments as "
                    f"{segmentation.GetSourceRepresentationName().lower()}s, not as a binary labelmap; "
                    "choose another segmentation or create a new one")

    def apply(self, job, outputSegmentation=None, probabilityVolume=None):
        """Write the job's result into MRML (main thread); returns the segmentation node."""
        volume = job.inputVolume
        scene = volume.GetScene()
        if scene is None:
            raise InputError(f"the input volume {_node_label(volume)} was removed from the scene")
        self.checkOutputs(volume, outputSegmentation, probabilityVolume)
        for node in (outputSegmentation, probabilityVolume):  # e.g. deleted while the job ran
            if node is not None and node.GetScene() is not scene:
                raise InputError(f"the output {_node_label(node)} is no longer in the scene; choose another "
                                 "output and apply again")
        if outputSegmentation is None:
            outputSegmentation = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{volume.GetName()} segmentation"))
            outputSegmentation.CreateDefaultDisplayNodes()
            outputSegmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
            _place_beside(outputSegmentation, volume)
        outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        if not outputSegmentation.GetSegmentation().IsSourceRepresentationImageData():  # empty (checked)
            outputSegmentation.SetSourceRepresentationToBinaryLabelmap()

        labels = sitk.GetArrayViewFromImage(job.result.labels)  # read only, while the job holds the image
        voxel_ml = float(np.prod(job.image.GetSpacing())) / 1000
        segmentation = outputSegmentation.GetSegmentation()
        modifier = slicer.vtkSlicerSegmentationsModuleLogic
        was_modifying = outputSegmentation.StartModify()
        try:
            for index, name in enumerate(job.classes[1:]):
                value = index + 1
                sid = segment_id(name)
                if segmentation.GetSegment(sid) is None:
                    title, color, terminology = pipeline.segment_style(index, name)
                    segmentation.AddEmptySegment(sid, title, color)
                    segmentation.GetSegment(sid).SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(),
                                                        terminology)
                mask = (labels == value).view(np.uint8)
                if not modifier.SetBinaryLabelmapToSegment(_oriented_labelmap(mask, job.ijkToRAS),
                                                           outputSegmentation, sid, modifier.MODE_REPLACE):
                    raise RuntimeError(f"could not write segment {sid} into {_node_label(outputSegmentation)}")
                job.segmentIds[name] = sid
                job.volumesMl[name] = int(np.count_nonzero(mask)) * voxel_ml
        finally:
            outputSegmentation.EndModify(was_modifying)
        empty = [pipeline.segment_style(i, name)[0] for i, name in enumerate(job.classes[1:])
                 if not job.volumesMl.get(name)]
        if empty:
            job.warnings.append(f"nothing found for {', '.join(empty)}: the segment is empty")
        if probabilityVolume is not None:
            _set_volume(probabilityVolume, sitk.GetArrayViewFromImage(job.result.probability), job.ijkToRAS)
            probabilityVolume.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
            probabilityVolume.CreateDefaultDisplayNodes()
            display = probabilityVolume.GetDisplayNode()
            if display is not None:
                display.AutoWindowLevelOff()
                display.SetWindowLevelMinMax(0.0, 1.0)
        return outputSegmentation

    def process(self, inputVolume, outputSegmentation=None, modelPath=None, threads=None, progress=None,
                cancel=None, largestComponent=False, probabilityVolume=None):
        """Segment ``inputVolume`` (a CT scalar volume node in HU) and return the segmentation node.

        ``outputSegmentation``: the node to write into (default: a new one beside the volume); only
        this module's segments (IDs ``TernarySegmentation_<class>``) are added or replaced.
        ``modelPath``: a .tsm model file (default: the shipped model). ``threads``: default all cores.
        ``progress(fraction, stage)``, ``cancel()``: see pipeline.segment. ``largestComponent``: keep
        the largest connected component only. ``probabilityVolume``: a scalar volume node that
        receives the foreground probability (0..1) on the input's grid.

        Raises InputError (a ValueError) for unusable nodes or images, FileNotFoundError or
        ModelFileError for the model, Cancelled when cancelled (nothing is written then).
        """
        self.checkOutputs(inputVolume, outputSegmentation, probabilityVolume)
        job = self.prepare(inputVolume, modelPath, threads, largestComponent,
                           probabilities=probabilityVolume is not None)
        job.run(progress=progress, cancel=cancel)
        segmentation = self.apply(job, outputSegmentation, probabilityVolume)
        for message in job.warnings:
            log.warning("%s: %s", inputVolume.GetName(), message)
        log.info("%s: %s", inputVolume.GetName(), job.summary())
        self.lastJob = job
        return segmentation


def _place_beside(node, volume):
    """Put ``node`` in the subject hierarchy folder (study) of ``volume``, where there is one."""
    hierarchy = node.GetScene().GetSubjectHierarchyNode() if node.GetScene() else None
    if hierarchy is None:
        return
    volume_item, item = hierarchy.GetItemByDataNode(volume), hierarchy.GetItemByDataNode(node)
    if not (volume_item and item):
        return
    parent = hierarchy.GetItemParent(volume_item)
    if parent and parent != hierarchy.GetSceneItemID():
        hierarchy.SetItemParent(item, parent)


# ------------------------------------------------------------------------------------ headless

_headless = None


def headless_scene():
    """slicer.mrmlScene, creating it where there is no Slicer application (PyPI ``slicer-core``):
    an MRML scene with an application logic, its colour logic, and the volumes, segmentations and
    subject hierarchy logics registered (before any segmentation node, so that the labelmap
    conversion rules exist); ``slicer.modules.volumes.logic()`` etc. answer as in Slicer."""
    global _headless
    scene = getattr(slicer, "mrmlScene", None)
    if scene is not None:
        return scene
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()         # the built-in colour tables (no colour files needed)
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    logics = {}
    for name, cls in (("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    _headless = (scene, app, colors, logics)   # keep the VTK objects alive
    slicer.mrmlScene = scene
    if not hasattr(slicer, "modules"):
        slicer.modules = types.SimpleNamespace(**{
            name: types.SimpleNamespace(logic=(lambda logic=logic: logic)) for name, logic in logics.items()})
    return scene
