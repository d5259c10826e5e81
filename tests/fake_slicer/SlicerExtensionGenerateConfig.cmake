# Stand-in for Slicer's extension config generation: the metadata an extension must declare.
foreach(_fake_var EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION
                  EXTENSION_ICONURL EXTENSION_SCREENSHOTURLS EXTENSION_DEPENDS)
  if("${${_fake_var}}" STREQUAL "")
    message(FATAL_ERROR "${_fake_var} is not set")
  endif()
endforeach()
get_property(_fake_tests GLOBAL PROPERTY FAKE_SLICER_PYTHON_TESTS)
file(WRITE "${CMAKE_BINARY_DIR}/fake-slicer-extension.txt"
     "name=${PROJECT_NAME}\ncategory=${EXTENSION_CATEGORY}\npython_tests=${_fake_tests}\n")
