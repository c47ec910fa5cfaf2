"""A stand-in for torchvision where the wheel does not import beside the installed torch build (a CPU torch next to
a CUDA-built torchvision). The peers only use ``torchvision.transforms`` for their image pipeline: the few
transforms they call are here, on PIL and torch, with torchvision's semantics for the arguments they pass.
run.py puts bench/peers/standins on PYTHONPATH only for a peer venv without a working torchvision."""
__version__ = "0.0.0+standin"  # a valid version that no version check accepts as new
