"""Serving: the overlapped frame pipeline (compute, device-to-host copy, host encoding) and its sinks."""
