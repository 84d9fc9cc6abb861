"""Byte formats that are stored or sent: the block object codec."""
