"""e2ee_media."""
