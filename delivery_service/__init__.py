"""delivery_service."""
