"""Client-side runtimes: embedded (onnxruntime) and triton (tritonclient)."""

from uqserve.runtime.base import Batch, MemberOutputs, Runtime

__all__ = ["Batch", "MemberOutputs", "Runtime"]
