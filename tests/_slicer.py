"""The module under PyPI's ``slicer-core`` (MRML, logics and slicer.util without Qt or the app).

``scene()`` is the product's own headless recipe (slicer_logic.headless_scene). ``load_module()``
imports TernarySegmentation/TernarySegmentation.py with minimal stand-ins for the parts of Slicer
that slicer-core lacks (qt, slicer.i18n, slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper):
enough to construct its Logic, run its Test class, and drive its Widget's run / cancel / error
handling with stand-in widgets (the Widget's Qt side is checked through its .ui file and source in
tests/test_slicer_ui.py).
"""

import importlib
import logging
import sys
import types
import unittest
from pathlib import Path

slicer = importlib.import_module("slicer")  # PyPI slicer-core: a test dependency (pyproject test extra)

MODULE_DIR = Path(__file__).resolve().parent.parent / "TernarySegmentation"
SHARED_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "example_ct_sm.nii.gz"


def scene():
    from TernarySegmentationLib import slicer_logic

    return slicer_logic.headless_scene()


def _stub(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


class _ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class _ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent


class _ScriptedLoadableModuleLogic:
    """The parts of Slicer's ScriptedLoadableModuleLogic the module uses (same behaviour)."""

    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = self.__class__.__name__.removesuffix("Logic")
        self.isSingletonParameterNode = True


class _ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, requestedDelay=None, msec=None):
        logging.info(message)


def _identity(cls):
    return cls


class _WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


def load_module():
    """The TernarySegmentation module file, imported as Slicer would (its folder on sys.path)."""
    scene()
    if "TernarySegmentation" in sys.modules:
        return sys.modules["TernarySegmentation"]
    _stub("qt", QTimer=object)
    _stub("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
    _stub("slicer.parameterNodeWrapper", parameterNodeWrapper=_identity, WithinRange=_WithinRange)
    _stub("slicer.ScriptedLoadableModule", ScriptedLoadableModule=_ScriptedLoadableModule,
          ScriptedLoadableModuleWidget=_ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic=_ScriptedLoadableModuleLogic,
          ScriptedLoadableModuleTest=_ScriptedLoadableModuleTest)
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    return importlib.import_module("TernarySegmentation")
