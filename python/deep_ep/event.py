"""deep_ep.event: the event types under their earlier module name. They are defined in deep_ep.utils, where
DeepEP V1 clients import them from; both names refer to the same classes."""

from .utils import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
