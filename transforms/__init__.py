"""Beam PTransforms and DoFns over Arrow record batches: read, validate, dedup, join, label, score, write."""
