"""Toy visual question answering: generated scenes of coloured shapes with questions whose answers are known.

:mod:`rlens.toy.data` draws the scenes and questions (numpy and Pillow only, deterministic from a seed);
``rlens eval`` scores an exported pipeline on a set written by it.
"""
