"""The operator: places instances on nodes, evicts idle ones, keeps min/max, writes model status.

Its planners are pure functions; its drivers (kopf handlers, the local loop) do the I/O. The CLI in
this package is the composition root that may import every role.
"""
