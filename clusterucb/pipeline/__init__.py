"""Workflow stages: each function reads the files it is given, calls the library and writes its outputs atomically.

One module per stage family; ``workflow_scripts/*.py`` call exactly one of these functions.
"""
