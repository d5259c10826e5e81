# A stand-in for an installed Slicer's SlicerConfig.cmake, for tests/test_cmake_build.py: just enough
# of Slicer's extension build interface to configure and build this extension outside Slicer, with
# the same checks and build-tree layout as Slicer's slicerMacroBuildScriptedModule
# (CMake/SlicerMacroBuildScriptedModule.cmake + ctkMacroCompilePythonScript: every SCRIPTS and
# RESOURCES entry must exist and is copied to <build>/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/<same path>).
set(Slicer_FOUND TRUE)
set(Slicer_USE_PYTHONQT ON)
set(Slicer_VERSION_MAJOR 5)
set(Slicer_VERSION_MINOR 10)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.10/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionGenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionCPack.cmake")
