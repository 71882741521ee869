"""Cairn installer."""
