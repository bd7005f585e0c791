"""The ``layout`` condition: labelled boxes, as (class, top-left, bottom-right) cross-attention tokens."""
