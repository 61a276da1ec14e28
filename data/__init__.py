"""Read a dataset from wherever it lives, in whatever format, into token columns."""
