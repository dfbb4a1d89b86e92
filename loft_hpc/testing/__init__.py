"""Test and tool support that ships with the package (no production code path imports it)."""
