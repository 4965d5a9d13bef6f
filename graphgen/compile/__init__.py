"""Compiling ONNX graphs with Apache TVM: targets, build and link, running built libraries."""

from graphgen.compile.targets import TARGETS, TargetSpec, resolve_target
from graphgen.compile.tvm_build import compile_model, import_onnx, prepare_for_tvm, run_library

__all__ = ["TARGETS", "TargetSpec", "resolve_target", "compile_model", "import_onnx", "prepare_for_tvm",
           "run_library"]
