"""InfoMap: the map equation and its two-level minimization (Rosvall & Bergstrom 2008), C++ core in csrc/infomap."""

from .api import InfomapResult, MapEquationResult, infomap, map_equation
from .graph import Graph, as_graph

__all__ = ["Graph", "InfomapResult", "MapEquationResult", "as_graph", "infomap", "map_equation"]
