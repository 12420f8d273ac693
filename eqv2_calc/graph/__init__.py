"""Atomic structures as packed tensors and their periodic radius graphs."""

from eqv2_calc.graph.batch import AtomsBatch, atoms_to_batch
from eqv2_calc.graph.neighbors import Graph, radius_graph

__all__ = ["AtomsBatch", "atoms_to_batch", "Graph", "radius_graph"]
