"""ambient-ray."""
