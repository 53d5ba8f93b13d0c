"""Workflows: whole procedures (building the zoo) made of library calls from every layer below."""
