"""The settings a run is given, and the record it leaves: the options schema (``CompressConfig``,
``LayerSettings``, one table from which the Python keywords, the CLI flags and the checks are
derived), the size planner's vocabulary (menus, sizes such as ``"60MB"``), and the record a
compressed layer keeps (``LayerCompression``) with the report built from them.

May import :mod:`toolkit.measure`, :mod:`toolkit.model` and :mod:`toolkit.solver`.
"""
