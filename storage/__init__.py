"""Cairn storage."""
