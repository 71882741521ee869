"""Cairn appliance."""
