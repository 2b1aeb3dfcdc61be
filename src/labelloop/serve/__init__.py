"""The ML-backend HTTP server."""
