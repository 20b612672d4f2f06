"""Decoding images, their perceptual hashes, and choices measured on this machine."""
