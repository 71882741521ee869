"""Cairn compute."""
