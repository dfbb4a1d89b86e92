"""Analysis metrics over loft_hpc run files: the paper's filter distance between filter rankings."""
from loft_hpc.metrics.filter_distance import (chance_distance, distance_matrix, distance_to_reference,
                                              filter_distance, rank_positions, ranking, reversed_distance)

__all__ = ["chance_distance", "distance_matrix", "distance_to_reference", "filter_distance", "rank_positions",
           "ranking", "reversed_distance"]
