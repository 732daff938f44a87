"""Torch tensors to core TensorViews, with argument names in every error (docs/design.md decision 7)."""

from typing import Optional

import torch

from . import _C


def view(t, arg: str) -> "_C.TensorView":
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    try:
        # get_device(): the CUDA index, -1 on the CPU (cheaper than building a torch.device)
        return _C.make_view(t.data_ptr(), str(t.dtype), list(t.shape), list(t.stride()), t.get_device())
    except TypeError as error:  # a dtype the core has no name for
        raise TypeError(f"{arg}: {error}") from None


def optional_view(t, arg: str) -> Optional["_C.TensorView"]:
    return None if t is None else view(t, arg)
