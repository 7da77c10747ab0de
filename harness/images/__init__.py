"""The image side of the matrix: which cells exist (``matrix``), how each cell's
image is built (``build``), and the compose file that runs them without the
harness (``compose``)."""
