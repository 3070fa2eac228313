"""The native host kernels: the C++ extension `engine.native._C` (framework-free headers
in cpp/include, one pybind11 binding file) and `engine.native.ops`, which hands it torch
tensors without copies and keeps a plain-torch fallback."""
