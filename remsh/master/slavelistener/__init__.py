"""Slave listeners: each connects slaves over one transport and registers them."""
