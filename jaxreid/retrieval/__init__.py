"""Retrieval: feature distances, the Market evaluation protocol, k-reciprocal Jaccard, re-ranking.

docs/reference.md sections 4 and 5, one module per part:

* `distances`: every feature distance outside the training losses (squared Euclidean from full
  float32 dot products, blocked over rows with JAX; the k-reciprocal 'original distance');
* `protocol`: mAP / CMC under the Market protocol (`market_metrics`,
  `market_metrics_from_distances`, `format_results`);
* `neighbours`: the blocked exact nearest-neighbour pass (`nearest_neighbours`);
* `kreciprocal`: k-reciprocal sets, V, query expansion and the sparse Jaccard numerator;
* `reranking`: the training-time Jaccard distance (`jaccard_distance`, `JaccardGraph`,
  `source_term`) and test-time re-ranking (`rerank`).

The names below are the package's public interface (`retrieval.market_metrics(...)` etc.).
"""

from jaxreid.retrieval.distances import full_dot_t
from jaxreid.retrieval.distances import squared_distance
from jaxreid.retrieval.neighbours import NeighbourTable
from jaxreid.retrieval.neighbours import nearest_neighbours
from jaxreid.retrieval.protocol import format_results
from jaxreid.retrieval.protocol import market_metrics
from jaxreid.retrieval.protocol import market_metrics_from_distances
from jaxreid.retrieval.reranking import JaccardGraph
from jaxreid.retrieval.reranking import jaccard_distance
from jaxreid.retrieval.reranking import rerank
from jaxreid.retrieval.reranking import source_term

__all__ = [
    'full_dot_t',
    'squared_distance',
    'market_metrics',
    'market_metrics_from_distances',
    'format_results',
    'JaccardGraph',
    'NeighbourTable',
    'nearest_neighbours',
    'source_term',
    'jaccard_distance',
    'rerank',
]
