"""Generation, quality metrics, the featurizer network, galleries, the comparison report."""
