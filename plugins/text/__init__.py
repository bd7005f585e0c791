"""The ``text`` condition: a caption, encoded into cross-attention tokens by a transformer."""
