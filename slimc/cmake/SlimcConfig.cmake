# slimc's CMake module: compile a model as part of a CMake build.
#
#   execute_process(COMMAND slimc --cmake-dir OUTPUT_VARIABLE SLIMC_CMAKE_DIR
#                   OUTPUT_STRIP_TRAILING_WHITESPACE)
#   find_package(Slimc REQUIRED CONFIG PATHS "${SLIMC_CMAKE_DIR}" NO_DEFAULT_PATH)
#
#   slimc_compile(encoder
#       MODEL   ${CMAKE_SOURCE_DIR}/models/minilm      # HF folder, .pt2, or module:factory
#       TARGET  arm                                    # any `slimc targets` name
#       RECIPE  ${CMAKE_SOURCE_DIR}/recipes/bert-int8.yaml
#       INPUTS  input_ids=1x128:int64 attention_mask=1x128:int64
#       OUTPUT  ${CMAKE_BINARY_DIR}/encoder.slimc)     # default: <build dir>/<name>.slimc
#   target_link_libraries(app PRIVATE encoder)         # encoder = the imported model.so
#
# The custom command uses slimc's depfile (every file the compile read: weights, config,
# recipe, calibration data), so the model is recompiled exactly when one of them changes; an
# unchanged recompile is served from slimc's compile cache. After the call,
# <NAME>_SLIMC_DIR holds the artifact directory (model.so, manifest.json, ...).
#
# SLIMC_EXECUTABLE: the slimc command (default: `slimc` on PATH); e.g.
#   -DSLIMC_EXECUTABLE="/opt/venv/bin/slimc"

cmake_minimum_required(VERSION 3.20)  # DEPFILE for the Makefile generators

if(NOT SLIMC_EXECUTABLE)
  find_program(SLIMC_EXECUTABLE slimc)
endif()
if(NOT SLIMC_EXECUTABLE)
  message(FATAL_ERROR "slimc not found: pip install slimc, or set -DSLIMC_EXECUTABLE=/path/to/slimc")
endif()
set(Slimc_FOUND TRUE)

function(slimc_compile name)
  cmake_parse_arguments(ARG "" "MODEL;TARGET;RECIPE;PIPELINE;OUTPUT" "INPUTS;OPTIONS" ${ARGN})
  if(NOT ARG_MODEL)
    message(FATAL_ERROR "slimc_compile(${name}): MODEL is required")
  endif()
  if(NOT ARG_OUTPUT)
    set(ARG_OUTPUT "${CMAKE_CURRENT_BINARY_DIR}/${name}.slimc")
  endif()
  get_filename_component(out "${ARG_OUTPUT}" ABSOLUTE BASE_DIR "${CMAKE_CURRENT_BINARY_DIR}")
  set(lib "${out}/model.so")
  set(cmd ${SLIMC_EXECUTABLE} compile "${ARG_MODEL}" -o "${out}" --depfile "${out}.d" --quiet)
  if(ARG_TARGET)
    list(APPEND cmd --target "${ARG_TARGET}")
  endif()
  set(deps "")
  if(ARG_RECIPE)
    get_filename_component(recipe "${ARG_RECIPE}" ABSOLUTE)
    list(APPEND cmd --recipe "${recipe}")
    list(APPEND deps "${recipe}")
  endif()
  if(ARG_PIPELINE)
    list(APPEND cmd --pipeline "${ARG_PIPELINE}")
  endif()
  foreach(spec IN LISTS ARG_INPUTS)
    list(APPEND cmd --input "${spec}")
  endforeach()
  list(APPEND cmd ${ARG_OPTIONS})
  add_custom_command(
    OUTPUT "${lib}" "${out}/manifest.json"
    COMMAND ${cmd}
    DEPENDS ${deps}
    DEPFILE "${out}.d"
    COMMENT "slimc: compiling ${name}"
    VERBATIM)
  add_custom_target(${name}_slimc ALL DEPENDS "${lib}")
  add_library(${name} SHARED IMPORTED GLOBAL)
  set_target_properties(${name} PROPERTIES IMPORTED_LOCATION "${lib}" IMPORTED_NO_SONAME TRUE)
  add_dependencies(${name} ${name}_slimc)
  set(${name}_SLIMC_DIR "${out}" PARENT_SCOPE)
endfunction()
