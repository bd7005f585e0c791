"""The ``image_text`` condition: a reference image (timm encoder) and a caption (the core's string
encoder, as the text plugin uses), together as one sequence of cross-attention tokens."""
