"""Library parts of maskdistill: teachers, students, heads, masking, views, codecs, cache store, data."""
