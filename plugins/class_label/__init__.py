"""The ``class`` condition: a class label, embedded as one cross-attention token or a vector."""
