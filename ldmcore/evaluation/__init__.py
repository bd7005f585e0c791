"""Faithfulness evaluation: exact readers of generated images and the scores built on them."""
