"""Cairn network."""
