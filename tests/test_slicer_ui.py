"""The Widget without Qt: Resources/UI/TernarySegmentation.ui parses, defines every widget the
module's code uses, and its SlicerParameterName properties are exactly the parameter node's fields,
each on a widget class that Slicer's parameterNodeWrapper connects to that field's type
(Base/Python/slicer/parameterNodeWrapper/guiConnectors.py)."""

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parent.parent / "TernarySegmentation"
UI = MODULE_DIR / "Resources" / "UI" / "TernarySegmentation.ui"
SOURCE = MODULE_DIR / "TernarySegmentation.py"

# field type -> widget classes a parameterNodeWrapper GUI connector accepts for it
CONNECTORS = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "int": {"QSpinBox", "QSlider", "QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "qMRMLSliderWidget"},
    "str": {"QLineEdit", "QLabel", "QTextEdit", "QComboBox", "ctkComboBox"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},
}


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI).getroot()


@pytest.fixture(scope="module")
def widgets(ui):
    return {w.get("name"): w for w in ui.iter("widget")}


@pytest.fixture(scope="module")
def source_tree():
    return ast.parse(SOURCE.read_text())


def parameter_fields(tree):
    """name -> annotation source of the @parameterNodeWrapper class's fields."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            return {item.target.id: ast.unparse(item.annotation)
                    for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in TernarySegmentation.py")


def field_kind(annotation):
    base = re.sub(r"^Annotated\[([^,]+),.*\]$", r"\1", annotation).strip()
    return "node" if base.startswith("vtkMRML") else base


def prop(widget, name):
    for p in widget.findall("property"):
        if p.get("name") == name:
            return p
    return None


def text_of(widget, name):
    p = prop(widget, name)
    return None if p is None else "".join(p.itertext()).strip()


def test_ui_is_a_qmrml_widget_named_after_the_module(ui):
    assert ui.get("version") == "4.0"
    assert ui.findtext("class") == "TernarySegmentation"
    top = ui.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "TernarySegmentation")
    names = [w.get("name") for w in ui.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    used = {w.get("class") for w in ui.iter("widget")}
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= declared


def test_every_widget_the_code_uses_is_in_the_ui(widgets, source_tree):
    used = {node.attr for node in ast.walk(source_tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"}
    assert {"applyButton", "cancelButton", "progressBar", "statusLabel"} <= used
    assert sorted(used - set(widgets)) == []
    kinds = {"applyButton": "QPushButton", "cancelButton": "QPushButton", "resetModelButton": "QPushButton",
             "progressBar": "QProgressBar", "statusLabel": "QLabel", "threadsSpinBox": "QSpinBox",
             "modelPathLineEdit": "ctkPathLineEdit"}
    assert {name: widgets[name].get("class") for name in kinds} == kinds


def test_parameter_names_match_the_parameter_node(widgets, source_tree):
    fields = parameter_fields(source_tree)
    assert set(fields) == {"inputVolume", "outputSegmentation", "modelPath", "threads", "largestComponent",
                           "probabilityVolume"}
    bound = {}
    for name, widget in widgets.items():
        value = text_of(widget, "SlicerParameterName")
        if value is not None:
            assert prop(widget, "SlicerParameterName").get("stdset") == "0"   # a dynamic property
            assert value not in bound, f"{value} bound twice"
            bound[value] = widget
    assert set(bound) == set(fields)
    for field, annotation in fields.items():
        kind = field_kind(annotation)
        assert bound[field].get("class") in CONNECTORS[kind], (field, annotation, bound[field].get("class"))
        if kind == "node":
            node_types = [s.text for s in prop(bound[field], "nodeTypes").iter("string")]
            assert node_types == [annotation], field
            assert text_of(bound[field], "showChildNodeTypes") == "false", field  # no label maps as CT


def test_mrml_widgets_get_the_scene_and_outputs_can_be_created(ui, widgets):
    combos = {n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in ui.iter("connection")
                 if c.findtext("sender") == "TernarySegmentation"
                 and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert combos == connected == {"inputSelector", "outputSegmentationSelector", "probabilityVolumeSelector"}
    assert text_of(widgets["inputSelector"], "noneEnabled") == "false"
    output = widgets["outputSegmentationSelector"]
    assert (text_of(output, "noneEnabled"), text_of(output, "addEnabled")) == ("true", "true")
    assert text_of(output, "noneDisplay") == "Create new segmentation"
    assert text_of(widgets["probabilityVolumeSelector"], "noneEnabled") == "true"
    assert text_of(widgets["applyButton"], "enabled") == "false"     # until an input is selected
    assert text_of(widgets["cancelButton"], "enabled") == "false"
    assert "*.tsm" in text_of(widgets["modelPathLineEdit"], "nameFilters")


def test_widget_follows_the_slicer_template(source_tree):
    """The calls the current Slicer template makes (loadUI, childWidgetVariables, setMRMLScene,
    connectGui) are made, buttons are connected, errors go through tryWithErrorDisplay, and the
    worker thread never touches MRML (it only calls job.run)."""
    source = SOURCE.read_text()
    for needle in ('slicer.util.loadUI(self.resourcePath("UI/TernarySegmentation.ui"))',
                   "slicer.util.childWidgetVariables(uiWidget)", "uiWidget.setMRMLScene(slicer.mrmlScene)",
                   "self._parameterNode.connectGui(self.ui)", "disconnectGui(self._parameterNodeGuiTag)",
                   'self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)',
                   'self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)',
                   "slicer.util.tryWithErrorDisplay(", "threading.Thread(target=work"):
        assert needle in source, needle
    work = next(n for n in ast.walk(source_tree) if isinstance(n, ast.FunctionDef) and n.name == "work")
    calls = {ast.unparse(c.func) for c in ast.walk(work) if isinstance(c, ast.Call)}
    assert calls == {"job.run"}


def test_module_metadata(source_tree):
    source = SOURCE.read_text()
    assert 'self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]' in source
    assert "Not for clinical use" in source and "TernaryNet" in source and "Heinrich" in source
    classes = {n.name for n in source_tree.body if isinstance(n, ast.ClassDef)}
    assert {"TernarySegmentation", "TernarySegmentationWidget", "TernarySegmentationLogic",
            "TernarySegmentationTest", "TernarySegmentationParameterNode"} <= classes
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in source
    assert (MODULE_DIR / "Resources" / "Icons" / "TernarySegmentationPhantomCT.png").is_file()
