"""Slave collections: where listeners put connected slaves and callers find them."""
