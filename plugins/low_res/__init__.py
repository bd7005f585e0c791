"""The ``low_res`` condition: 4x super-resolution from a noise-augmented low-resolution image."""
