"""The module's Logic on MRML nodes, under PyPI's slicer-core (no Slicer application).

The oracle is the ``ternaryseg`` command on the same file: the segment's labelmap, read back with
slicer.util (an independent path from the Logic's writer), must equal it voxel for voxel.
"""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests import _slicer
from TernarySegmentationLib import cli, pipeline
from TernarySegmentationLib.phantom import make_phantom

slicer = _slicer.slicer
from TernarySegmentationLib import slicer_logic  # noqa: E402  (needs slicer)

SID = slicer_logic.segment_id("pancreas")


@pytest.fixture
def scene():
    scene = _slicer.scene()
    scene.Clear()
    return scene


@pytest.fixture(scope="module")
def logic():
    return slicer_logic.SegmentationLogic()


def load_volume(path, name="CT"):
    """A file loaded as Slicer loads it (its volumes logic and ITK readers), not by our code."""
    volume = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), name, 0)
    assert volume is not None, path
    return volume


def ternaryseg(path, tmp_path, *extra, volume=None, name="ternaryseg.nii.gz"):
    """``ternaryseg path -o OUT`` read back; with ``volume``: on that node's voxel grid. (Slicer's
    reader may store a file's voxels in another i, j, k order, e.g. k reversed for a left-handed
    NIfTI; the physical grid is the same, so nearest-neighbour resampling only permutes voxels.)"""
    out = tmp_path / name
    assert cli.main([str(path), "-o", str(out), "-q", *extra]) == 0
    image = sitk.ReadImage(str(out))
    if volume is not None:
        image = on_grid(image, volume)
    return sitk.GetArrayFromImage(image)


def on_grid(image, volume):
    grid = slicer_logic.volume_to_image(volume)
    corner = np.abs(np.array(grid.GetOrigin()) - grid.TransformIndexToPhysicalPoint((0, 0, 0)))
    assert corner.max() == 0
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())


def segment_array(segmentation, volume, sid=SID):
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, sid, volume)


def matrix(node):
    m = slicer_logic.vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory):
    """A small phantom CT with a rotated, flipped direction (oblique acquisition), as a NIfTI file."""
    case = make_phantom(200_003, shape=(40, 96, 96), spacing=(3.0, 3.0, 4.0), oriented=True)
    path = tmp_path_factory.mktemp("phantom") / "phantom_ct.nii.gz"
    sitk.WriteImage(case.to_sitk()[0], str(path))
    return path


def test_logic_on_shared_ct_equals_ternaryseg(scene, logic, tmp_path):
    if not _slicer.SHARED_CT.is_file():
        pytest.skip("../shared/data/ct/example_ct_sm.nii.gz is not in this checkout")
    volume = load_volume(_slicer.SHARED_CT)
    segmentation = logic.process(volume)
    got = segment_array(segmentation, volume)
    expected = ternaryseg(_slicer.SHARED_CT, tmp_path)
    assert got.shape == expected.shape == slicer.util.arrayFromVolume(volume).shape
    assert np.array_equal(got, expected)
    assert 200 < np.count_nonzero(got) < 5000   # a pancreas-sized result on this 3 mm CT


def test_logic_on_oblique_phantom_equals_ternaryseg(scene, logic, phantom_file, tmp_path):
    volume = load_volume(phantom_file)
    segmentation = logic.process(volume, threads=2)
    got = segment_array(segmentation, volume)
    expected = ternaryseg(phantom_file, tmp_path, "--threads", "2", volume=volume)
    assert np.count_nonzero(expected) > 100
    assert np.array_equal(got, expected)


def test_volume_node_and_image_geometry_round_trip(scene, phantom_file):
    """volume_to_image of Slicer's reading of a file is SimpleITK's reading of it, voxel for voxel in
    physical space; image_to_volume then volume_to_image gives the image back exactly."""
    volume = load_volume(phantom_file)
    ours = slicer_logic.volume_to_image(volume)
    theirs = sitk.ReadImage(str(phantom_file))
    assert np.array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(on_grid(theirs, volume)))
    for corner in [(0, 0, 0), (95, 0, 0), (0, 95, 0), (0, 0, 39), (95, 95, 39)]:
        np.testing.assert_allclose(ours.TransformIndexToPhysicalPoint(corner),
                                   theirs.TransformIndexToPhysicalPoint(
                                       theirs.TransformPhysicalPointToIndex(
                                           ours.TransformIndexToPhysicalPoint(corner))), atol=1e-3)
    back = slicer_logic.volume_to_image(slicer_logic.image_to_volume(theirs, name="pushed"))
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(theirs))
    np.testing.assert_allclose(back.GetSpacing(), theirs.GetSpacing(), rtol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), theirs.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), theirs.GetDirection(), atol=1e-12)


def test_segment_name_terminology_colour_and_geometry(scene, logic, phantom_file):
    volume = load_volume(phantom_file, "Abdomen CT")
    segmentation = logic.process(volume)
    assert segmentation.GetName() == "Abdomen CT segmentation"
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    assert segmentation.GetSegmentation().GetSegmentIDs() == (SID,)
    segment = segmentation.GetSegmentation().GetSegment(SID)
    assert segment.GetName() == "Pancreas"
    assert [round(c * 255) for c in segment.GetColor()] == [249, 180, 111]
    entry = slicer.vtkSlicerTerminologyEntry()
    tag = segment.GetTerminology()
    assert tag == pipeline.PANCREAS_TERMINOLOGY
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(tag, entry)
    kind, category = entry.GetTypeObject(), entry.GetCategoryObject()
    assert (kind.GetCodingSchemeDesignator(), kind.GetCodeValue(), kind.GetCodeMeaning()) == \
        ("SCT", "15776009", "Pancreas")
    assert (category.GetCodeValue(), category.GetCodeMeaning()) == ("123037004", "Anatomical Structure")
    # the stored labelmap lies on the volume's voxel grid (no resampling anywhere)
    labelmap = segment.GetRepresentation("Binary labelmap")
    image_to_world = slicer_logic.vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_world)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(image_to_world), matrix(volume), atol=1e-9)
    assert segmentation.GetDisplayNode() is not None


def test_other_segments_survive_and_a_rerun_replaces_only_its_own(scene, logic, phantom_file, tmp_path):
    volume = load_volume(phantom_file)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ct = slicer.util.arrayFromVolume(volume)
    drawn = {}
    for name, mask in (("Pancreas (manual)", ct > 100), ("Body", ct > -500)):  # both overlap the result
        sid = segmentation.GetSegmentation().AddEmptySegment("", name, [0.2, 0.4, 0.6])
        drawn[sid] = mask.astype(np.uint8)
        slicer.util.updateSegmentBinaryLabelmapFromArray(drawn[sid], segmentation, sid, volume)
    first = segment_array(logic.process(volume, segmentation), volume)
    assert np.count_nonzero(first)
    segmentation.GetSegmentation().GetSegment(SID).SetColor(0.0, 1.0, 0.0)   # the user's choice
    # the second run differs (largest component only) and must replace, not merge
    assert logic.process(volume, segmentation, largestComponent=True) is segmentation
    second = segment_array(segmentation, volume)
    assert np.array_equal(second, ternaryseg(phantom_file, tmp_path, "--largest-component", volume=volume))
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 3
    assert segmentation.GetSegmentation().GetSegment(SID).GetColor() == (0.0, 1.0, 0.0)
    for sid, mask in drawn.items():
        assert np.array_equal(segment_array(segmentation, volume, sid), mask), sid


def test_probability_volume(scene, logic, phantom_file, tmp_path):
    volume = load_volume(phantom_file)
    probability = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "p")
    segmentation = logic.process(volume, probabilityVolume=probability)
    p = slicer.util.arrayFromVolume(probability)
    assert p.dtype == np.float32 and p.shape == slicer.util.arrayFromVolume(volume).shape
    np.testing.assert_array_equal(matrix(probability), matrix(volume))
    out = tmp_path / "p.nii.gz"
    ternaryseg(phantom_file, tmp_path, "--probabilities", str(out))
    # the same physical points, but this node's k axis is reversed (Slicer's reader): the linear
    # interpolation weights are computed from mirrored indices, so equal to float32 rounding
    np.testing.assert_allclose(p, sitk.GetArrayFromImage(on_grid(sitk.ReadImage(str(out)), volume)),
                               rtol=0, atol=1e-6)
    labels = segment_array(segmentation, volume) > 0   # nearest vs linear onto the CT grid: near-equal
    assert np.count_nonzero(labels != (p > 0.5)) < 0.2 * np.count_nonzero(labels)  # boundary only


def test_progress_and_cancel(scene, logic, phantom_file):
    volume = load_volume(phantom_file)
    seen = []
    logic.process(volume, progress=lambda fraction, stage: seen.append((fraction, stage)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert {"preprocess", "postprocess"} <= {stage for _, stage in seen}

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "untouched")
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3     # cancelled inside the network
    with pytest.raises(slicer_logic.Cancelled):
        logic.process(volume, segmentation, cancel=cancel)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0


def test_transformed_volume(scene, logic, phantom_file):
    volume = load_volume(phantom_file)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation = logic.process(volume)
    assert segmentation.GetTransformNodeID() == transform.GetID()
    elsewhere = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "elsewhere")
    with pytest.raises(slicer_logic.InputError, match="another transform"):
        logic.process(volume, elsewhere)


def _volume(scene, array, cls="vtkMRMLScalarVolumeNode", name="bad"):
    node = scene.AddNewNodeByClass(cls, name)
    slicer_logic._set_volume(node, array, np.diag([3.0, 3.0, 3.0, 1.0]))
    return node


@pytest.mark.parametrize("case, message", [
    ("none", "no input volume: select a CT volume"),
    ("2d", "is a 2D image"),
    ("labelmap", "is a label map, not a CT"),
    ("vector", "components per voxel"),
    ("empty", "has no voxels"),
    ("segmentation", "must be a scalar volume node"),
    ("constant", "everywhere: nothing to segment"),
    ("nan", "NaN or infinite"),
])
def test_bad_input_gives_a_clear_error(scene, logic, case, message):
    ct = np.full((8, 16, 16), -1000, np.int16)
    ct[2:6, 4:12, 4:12] = 40
    nodes = {
        "none": lambda: None,
        "2d": lambda: _volume(scene, ct[:1]),
        "labelmap": lambda: _volume(scene, (ct > 0).astype(np.uint8), "vtkMRMLLabelMapVolumeNode"),
        "vector": lambda: _volume(scene, np.stack([ct] * 3, -1), "vtkMRMLVectorVolumeNode"),
        "empty": lambda: scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "nothing"),
        "segmentation": lambda: scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg"),
        "constant": lambda: _volume(scene, np.zeros_like(ct)),
        "nan": lambda: _volume(scene, np.where(ct > 0, np.nan, -1000).astype(np.float32)),
    }
    node = nodes[case]()
    before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    with pytest.raises(pipeline.InputError) as raised:
        logic.process(node)
    assert message in str(raised.value)
    if case not in ("none", "segmentation"):
        assert "'bad'" in str(raised.value) or "'nothing'" in str(raised.value)   # names the node
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before   # nothing created


def test_bad_outputs_and_model_give_clear_errors(scene, logic, phantom_file, tmp_path):
    volume = load_volume(phantom_file)
    with pytest.raises(pipeline.InputError, match="must be a segmentation node"):
        logic.process(volume, outputSegmentation=volume)
    with pytest.raises(pipeline.InputError, match="is the input volume"):
        logic.process(volume, probabilityVolume=volume)
    with pytest.raises(FileNotFoundError, match="no such file"):
        logic.process(volume, modelPath=tmp_path / "missing.tsm")
    broken = tmp_path / "broken.tsm"
    broken.write_bytes(b"not a model")
    with pytest.raises(pipeline.ModelFileError):
        logic.process(volume, modelPath=broken)
    with pytest.raises(pipeline.InputError, match="threads"):
        logic.process(volume, threads=-1)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_model_is_cached_until_its_file_changes(logic, tmp_path):
    shipped = pipeline.default_model_path()
    assert logic.loadNetwork() is logic.loadNetwork(shipped) is logic.loadNetwork("") \
        is logic.loadNetwork(Path("")) is logic.loadNetwork(str(shipped))
    copy = tmp_path / "copy.tsm"
    copy.write_bytes(shipped.read_bytes())
    assert logic.loadNetwork(copy) is not logic.loadNetwork(shipped)


def test_module_file_logic_and_self_test_run_on_slicer_core(scene):
    """The module's own Logic class (TernarySegmentation.py) and its Slicer self-test."""
    module = _slicer.load_module()
    logic = module.TernarySegmentationLogic()
    assert logic.moduleName == "TernarySegmentation"
    assert isinstance(logic, slicer_logic.SegmentationLogic)
    test = module.TernarySegmentationTest()
    test.runTest()


def test_output_segmentation_must_store_labelmaps(scene, logic, phantom_file):
    """A segmentation whose segments are closed surfaces (e.g. imported STL) is refused before any
    work; an empty one is switched to binary labelmaps."""
    volume = load_volume(phantom_file)
    surfaces = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    surfaces.SetSourceRepresentationToClosedSurface()
    sphere = slicer_logic.vtk.vtkSphereSource()
    sphere.Update()
    segment = slicer.vtkSegment()
    segment.SetName("imported")
    segment.AddRepresentation("Closed surface", sphere.GetOutput())
    surfaces.GetSegmentation().AddSegment(segment)
    with pytest.raises(pipeline.InputError, match="closed surfaces, not as a binary labelmap"):
        logic.process(volume, surfaces)
    assert surfaces.GetSegmentation().GetSegmentIDs() == (surfaces.GetSegmentation().GetNthSegmentID(0),)

    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty surfaces")
    empty.SetSourceRepresentationToClosedSurface()
    logic.process(volume, empty)
    assert empty.GetSegmentation().IsSourceRepresentationImageData()
    assert np.count_nonzero(segment_array(empty, volume))


def test_outputs_removed_while_running_are_not_written(scene, logic, phantom_file):
    volume = load_volume(phantom_file)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "going away")
    job = logic.prepare(volume)
    job.run()                       # the GUI's worker thread
    scene.RemoveNode(segmentation)  # meanwhile the user deletes the chosen output
    with pytest.raises(pipeline.InputError, match="no longer in the scene"):
        logic.apply(job, segmentation)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0
    assert logic.apply(job).GetScene() is scene   # a new one still works


def test_sample_data_registration_makes_the_phantom_here(scene, monkeypatch):
    """registerSampleData passes SampleData what its SampleDataSource accepts (equal-length lists,
    an existing thumbnail, a callable customDownloader); the downloader makes the phantom CT."""
    import types

    module = _slicer.load_module()
    calls = []
    fake = types.SimpleNamespace(SampleDataLogic=types.SimpleNamespace(
        registerCustomSampleDataSource=lambda **kwargs: calls.append(kwargs)))
    monkeypatch.setitem(__import__("sys").modules, "SampleData", fake)
    module.registerSampleData()
    (kwargs,) = calls
    assert kwargs["sampleName"] == "PancreasPhantomCT"
    assert len(kwargs["uris"]) == len(kwargs["fileNames"]) == len(kwargs["nodeNames"]) == 0
    assert Path(kwargs["thumbnailFileName"]).is_file()
    volume = kwargs["customDownloader"](object())
    assert volume.GetName() == "PancreasPhantomCT"
    assert slicer.util.arrayFromVolume(volume).shape == (100, 416, 416)
    assert volume.GetSpacing() == pytest.approx((0.8, 0.8, 2.0))


def test_an_empty_result_is_reported(scene, logic):
    ct = np.full((24, 48, 48), -1000, np.int16)
    ct[4:20, 8:40, 8:40] = 40                     # a water box: no anatomy to find
    volume = _volume(scene, ct, name="water")
    segmentation = logic.process(volume)
    assert logic.lastJob.volumesMl == {"pancreas": 0.0}
    assert "nothing found for Pancreas: the segment is empty" in logic.lastJob.warnings
    assert not np.count_nonzero(segment_array(segmentation, volume))
