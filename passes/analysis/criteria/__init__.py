"""Sensitivity criteria: one analysis pass each, named ``sensitivity-<criterion>``.

A plugin adds a criterion by registering another :class:`~.base.SensitivityCriterion` subclass
through ``slimc_register_passes``; ``sensitivity{criterion=NAME}`` then finds it by name.
"""
