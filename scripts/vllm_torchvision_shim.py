"""Installed into the vLLM test environment (as a .pth hook) so that torchvision imports beside a CPU torch.

PyPI's Linux torchvision wheels are CUDA builds; beside torch's CPU build their C++ operators do not
register and `import torchvision` fails with "operator torchvision::nms does not exist". vLLM's
Qwen2.5-VL path needs transformers' video processor, which imports torchvision. Declaring the two
operator schemas torchvision looks up at import time, just before it is first imported, lets it load;
the image processors never call those operators.
"""

import importlib.abc
import sys


class _DeclareTorchvisionSchemas(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            library = torch.library.Library("torchvision", "DEF")
            library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            sys.modules[__name__].library = library  # deregistered when collected: keep it
        return None


sys.meta_path.insert(0, _DeclareTorchvisionSchemas())
